"""Office-31 domain adaptation on ResNet-50: one config, the method and task as arguments.

    xmodal train --config experiments/office31/da.py:method=dann,task=A2W \
        --workdir workdirs/office31_dann_a2w

`method`: `source_only` (labelled source only), `dann` (gradient reversal, domain
discriminator), `dan` (multi-kernel MMD), `jan` (joint MMD), `cdan` (conditional adversarial,
multilinear map), `mcc` (minimum class confusion). Needs the prepared dataset
(`python -m xmodal_jax.data.office31 --manual_dir DIR`); the table over all tasks and methods
is experiments/tables/office31.py. Not measured here: no Office-31 images and no ImageNet
ResNet-50 are available offline.

The recipe follows the Office-31 protocol of domain-adaptation benchmarks (TLlib's ResNet-50
recipe): batch 32 per domain, SGD with Nesterov momentum 0.9, lr 0.01·(1 + 0.001·step)^-0.75,
weight decay 1e-3, the backbone at 0.1x the rate of the new head (and of the domain
discriminator), 20,000 steps, no bottleneck layer (TLlib adds a 256-wide one); images resized
to 256x256 (done when the dataset is prepared), random 224 px crops and flips for training,
resized to 224 px for evaluation; accuracy on all target images at the final step.

Arguments: `method` (above), `task` (A2W, D2W, W2D, A2D, D2A, W2A), `model` (a zoo ResNet,
or `lenet` for quick checks), `width` (ResNet width multiplier), `image_size`, `steps`,
`pretrained`. The data is a manual download: see `xmodal_jax/data/office31.py`.

`pretrained` (default `auto`): the ImageNet weights ResNet-50 starts from, as the benchmark
assumes. `auto` is torchvision's ImageNet-1k ResNet-50 (`IMAGENET1K_V1`; TLlib's recipe loads
torchvision's `model_urls['resnet50']`, thuml/Transfer-Learning-Library
tllib/vision/models/resnet.py), read from `resnet50-0676ba61.pth` where torchvision caches it
(`~/.cache/torch/hub/checkpoints/`); no hub is reached, so put the file there (or give its path,
or a checkpoint written by `xmodal convert`). `auto` means random weights for other models;
`none` forces random weights. The new 31-way head is always initialised fresh.
"""

import os

import ml_collections

from xmodal_jax.config import parse_arg

DOMAINS = {"A": "amazon", "D": "dslr", "W": "webcam"}
TASKS = ("A2W", "D2W", "W2D", "A2D", "D2A", "W2A")
# Each method's adaptation loss (`xmodal_jax.objectives.adaptation`); source_only has none.
METHODS = {"source_only": None, "dann": "dann", "dan": "mmd", "jan": "jmmd", "cdan": "cdan",
           "mcc": "mcc"}  # fmt: skip
TORCHVISION_RESNET50 = os.path.join(
    "~", ".cache", "torch", "hub", "checkpoints", "resnet50-0676ba61.pth"
)


def _data(domain: str, image_size: int, train: bool) -> dict:
    big = image_size * 256 // 224
    pp = (
        f"resize({big})|random_crop({image_size})|flip_lr" if train else f"resize({image_size})"
    ) + "|value_range(0, 1)|normalize|keep('image', 'label')"
    return {"name": f"office31/{DOMAINS[domain]}", "split": "train", "pp": pp}


def _eval(domain: str, image_size: int) -> dict:
    d = _data(domain, image_size, train=False)
    return {"type": "classification", "dataset": d["name"], "split": d["split"], "pp": d["pp"]}


def _args(arg: str | None) -> ml_collections.ConfigDict:
    args = parse_arg(
        arg, method="source_only", task="A2W", model="resnet50", width=1.0, image_size=224,
        steps=20000, pretrained="auto",
    )  # fmt: skip
    if args.task not in TASKS:
        raise ValueError(f"task={args.task!r}: use one of {list(TASKS)}.")
    if args.method not in METHODS:
        raise ValueError(f"method={args.method!r}: use one of {list(METHODS)}.")
    return args


def _pretrained(args: ml_collections.ConfigDict) -> str | None:
    if args.pretrained == "auto":
        imagenet = args.model == "resnet50" and args.width == 1.0
        return os.path.expanduser(TORCHVISION_RESNET50) if imagenet else None
    return None if args.pretrained == "none" else os.path.expanduser(args.pretrained)


def base_config(arg: str | None) -> ml_collections.ConfigDict:
    """Source-only training on the task's source domain; evaluation on source and target."""
    args = _args(arg)
    source, target = args.task[0], args.task[2]

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = args.steps
    c.batch_size = 32
    c.lr = 0.01
    c.wd = 1e-3
    c.optimizer = {"name": "sgd", "momentum": 0.9, "nesterov": True}
    c.lr_schedule = {"name": "inv", "gamma": 0.001, "power": 0.75}
    c.log_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.model = {"name": args.model, "num_classes": 31}
    if args.model.startswith("resnet"):
        c.model.width = args.width
        c.lr_mults = [("(model/)?(stem|stage).*", 0.1)]  # the backbone; head, discriminator: 1x
    c.pretrained = {"name": _pretrained(args)}
    c.task = "classification"
    c.data = _data(source, args.image_size, train=True)
    c.evals = {"source": _eval(source, args.image_size), "target": _eval(target, args.image_size)}
    c.eval_batch_size = 64
    c.office31_task = args.task
    return c


def adaptation_config(arg: str | None) -> ml_collections.ConfigDict:
    """Labelled source + unlabelled target (all target images) with the method's loss."""
    c, args = base_config(arg), _args(arg)
    c.task = "domain_adaptation"
    c.data = {
        "source": _data(args.task[0], args.image_size, train=True),
        "target": _data(args.task[2], args.image_size, train=True),
    }
    c.adaptation = {"method": METHODS[args.method]}
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    method = _args(arg).method
    return base_config(arg) if method == "source_only" else adaptation_config(arg)
