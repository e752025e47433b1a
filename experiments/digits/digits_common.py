"""Shared settings of the digits domain-adaptation configs (MNIST <-> UCI optdigits).

The recipe follows the digits protocol of domain-adaptation benchmarks: LeNet with a 256-wide
bottleneck, SGD with Nesterov momentum 0.9, lr 0.01·(1 + 0.001·step)^-0.75, weight decay 5e-4,
2,000 steps, batch 64 per domain; UCI images /16 and bilinearly upsampled to 28x28, MNIST /255.
The source is trained on `train[:90%]` of its dataset; `train[90%:]` is its validation split
(`eval/source_val`, the only metric that chooses anything, e.g. a method's trade-off). The
target is seen unlabelled (its train split) and reported on its test split, never used to choose.
"""

import ml_collections

from xmodal_jax.config import parse_arg

DOMAINS = {
    "mnist": ("digits_mnist5k", "value_range(0, 1)"),
    "uci": ("digits_uci", "value_range(0, 1, in_hi=16)|resize(28)"),
}
DIRECTIONS = {"m2u": ("mnist", "uci"), "u2m": ("uci", "mnist")}
SOURCE_TRAIN, SOURCE_VAL = "train[:90%]", "train[90%:]"


def domain_data(domain: str, split: str) -> dict:
    name, pp = DOMAINS[domain]
    return {"name": name, "split": split, "pp": pp + "|keep('image', 'label')"}


def base_config(arg: str | None) -> ml_collections.ConfigDict:
    """Common keys; `arg` takes `direction` (m2u or u2m) and `seed`."""
    args = parse_arg(arg, direction="m2u", seed=0)
    if args.direction not in DIRECTIONS:
        raise ValueError(f"direction={args.direction!r}: use one of {sorted(DIRECTIONS)}.")
    source, target = DIRECTIONS[args.direction]

    c = ml_collections.ConfigDict()
    c.seed = args.seed
    c.total_steps = 2000
    c.batch_size = 64
    c.lr = 0.01
    c.wd = 5e-4
    c.optimizer = {"name": "sgd", "momentum": 0.9, "nesterov": True}
    c.lr_schedule = {"name": "inv", "gamma": 0.001, "power": 0.75}
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.model = {"name": "lenet", "num_classes": 10, "bottleneck": 256}
    c.task = "classification"
    c.data = domain_data(source, SOURCE_TRAIN)
    c.evals = {
        "source_val": {"type": "classification", **_eval_data(source, SOURCE_VAL)},
        "source": {"type": "classification", **_eval_data(source)},
        "target": {"type": "classification", **_eval_data(target)},
        "a_distance": {
            "type": "a_distance",
            "source": _eval_data(source),
            "target": _eval_data(target),
            "tsne_points": 1000,  # the t-SNE plot at the end (0: none; 7 s of a run on CPU)
        },
    }
    c.eval_batch_size = 256
    c.direction = args.direction
    return c


def adaptation_config(arg: str | None, method: str, **options) -> ml_collections.ConfigDict:
    """Source-labelled + target-unlabelled training with the adaptation loss `method`."""
    c = base_config(arg)
    source, target = DIRECTIONS[c.direction]
    c.task = "domain_adaptation"
    c.data = {"source": domain_data(source, SOURCE_TRAIN), "target": domain_data(target, "train")}
    c.adaptation = {"method": method, **options}
    return c


def _eval_data(domain: str, split: str = "test") -> dict:
    d = domain_data(domain, split)
    return {"dataset": d["name"], "split": d["split"], "pp": d["pp"]}
