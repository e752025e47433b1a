"""Shared settings of the `animal_silhouettes` fine-tuning experiments (`finetune_*.py`).

ImageNet MobileNetV2 (`pretrained.load('mobilenet-v2-imagenet')`, torchvision's weights) gets a
new 10-class head (`params/head/` re-initialised, the 1000-class head dropped) and is fine-tuned
on 10% of the training labels: `data.per_class = 80` of the 800 training images of each class,
a fixed subset drawn with `data.subset_seed = 0` (`xmodal_jax.tasks.finetune.stratified_subset`;
a split slice such as `train[:10%]` would follow the builder's order, which is not stratified
per slice). Images are inverted to dark-on-light as in the quick start, at 64 px rather than
the quick start's 112 px so that a run takes a few minutes on 2 CPU cores (a train step at 112
px is about 4x slower); training adds random crops (72 -> 64) and flips.

Recipe (the task-adaptation recipe of thuml/Transfer-Learning-Library, scaled down): SGD with
Nesterov momentum 0.9, lr 0.01 with a cosine decay, the backbone at 0.1x the head's rate, no
weight decay, batch 32, 150 steps (6 passes over the 800 labelled images). The test split (2,000
images) is evaluated once, at the end, as `eval/test/accuracy`; nothing is chosen on it.
Results of every config: `experiments/animals/FINETUNE.md`, from the records of
`experiments/tables/transfer_ablation.py`.
"""

import ml_collections

from xmodal_jax.config import parse_arg

DATASET = "animal_silhouettes"


def image_pp(size: int, train: bool) -> str:
    """Preprocessing: inverted silhouettes, RGB, ImageNet normalisation; crops and flips for
    training."""
    resize = (
        f"resize({size + size // 8})|random_crop({size})|flip_lr" if train else f"resize({size})"
    )
    return f"invert|{resize}|grey_to_rgb|value_range(0, 1)|normalize|keep('image', 'label')"


def base_config(
    arg: str | None, **defaults
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The shared config and the parsed `arg` (`seed`, `steps`, `batch_size`, `image_size`,
    `per_class`, plus `defaults`)."""
    known = {"seed": 0, "steps": 150, "batch_size": 32, "image_size": 64, "per_class": 80}
    known.update(defaults)
    args = parse_arg(arg, **known)
    c = ml_collections.ConfigDict()
    c.task = "finetune"
    c.seed = args.seed
    c.total_steps = args.steps
    c.batch_size = args.batch_size
    c.lr = 0.01
    c.optimizer = {"name": "sgd", "momentum": 0.9, "nesterov": True}
    c.lr_schedule = {"name": "cosine", "warmup_steps": 0}
    c.lr_mults = [("head/.*", 1.0), (".*", 0.1)]
    c.log_every = 25
    c.eval_every = args.steps
    c.checkpoint_every = 0
    c.keep_checkpoints = 1
    c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.model = {"name": "mobilenet_v2", "num_classes": 10}
    c.pretrained = {"name": "mobilenet-v2-imagenet"}
    c.regularizer = {"name": "none"}
    c.data = {
        "name": DATASET,
        "split": "train",
        "pp": image_pp(args.image_size, train=True),
        "per_class": args.per_class,
        "subset_seed": 0,
    }
    c.evals = {
        "test": {
            "type": "classification",
            "dataset": DATASET,
            "split": "test",
            "pp": image_pp(args.image_size, train=False),
        }
    }
    c.eval_batch_size = 200
    return c, args
