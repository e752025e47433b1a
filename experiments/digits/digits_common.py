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
    "mnist_full": ("digits_mnist", "value_range(0, 1)"),
    "mnist_m_like": ("mnist_m_like", "value_range(0, 1)"),
    "syn_digits_like": ("syn_digits_like", "value_range(0, 1)|resize(28)"),
}
COLOUR = {"mnist_m_like", "syn_digits_like"}  # RGB: a grey domain beside one is repeated x3
DIRECTIONS = {
    "m2u": ("mnist", "uci"),
    "u2m": ("uci", "mnist"),
    # The shift benchmarks (experiments/tables/digits_shift.py): the full MNIST as source.
    "mf2u": ("mnist_full", "uci"),
    "mf2mm": ("mnist_full", "mnist_m_like"),
    "mf2syn": ("mnist_full", "syn_digits_like"),
}
SOURCE_TRAIN, SOURCE_VAL = "train[:90%]", "train[90%:]"
SOURCE_SPLITS = {"mnist_full": ("train", "validation")}  # else (SOURCE_TRAIN, SOURCE_VAL)


def domain_data(domain: str, split: str, direction: str | None = None) -> dict:
    """Dataset keys of `domain`; in a `direction` with a colour domain, grey images become RGB."""
    name, pp = DOMAINS[domain]
    if direction and domain not in COLOUR and COLOUR & set(DIRECTIONS[direction]):
        pp += "|grey_to_rgb"
    return {"name": name, "split": split, "pp": pp + "|keep('image', 'label')"}


def source_splits(direction: str) -> tuple[str, str]:
    """(train, validation) splits of the direction's source."""
    return SOURCE_SPLITS.get(DIRECTIONS[direction][0], (SOURCE_TRAIN, SOURCE_VAL))


def base_config(arg: str | None) -> ml_collections.ConfigDict:
    """Common keys; `arg` takes `direction` (m2u or u2m) and `seed`."""
    args = parse_arg(arg, direction="m2u", seed=0)
    if args.direction not in DIRECTIONS:
        raise ValueError(f"direction={args.direction!r}: use one of {sorted(DIRECTIONS)}.")
    source, target = DIRECTIONS[args.direction]
    train, val = source_splits(args.direction)
    d = args.direction

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
    c.data = domain_data(source, train, d)
    c.evals = {
        "source_val": {"type": "classification", **_eval_data(source, d, val)},
        "source": {"type": "classification", **_eval_data(source, d)},
        "target": {"type": "classification", **_eval_data(target, d)},
        "a_distance": {
            "type": "a_distance",
            "source": _eval_data(source, d),
            "target": _eval_data(target, d),
            "tsne_points": 1000,  # the t-SNE plot at the end (0: none; 7 s of a run on CPU)
        },
    }
    c.eval_batch_size = 256
    c.direction = args.direction
    return c


def adaptation_config(arg: str | None, method: str, **options) -> ml_collections.ConfigDict:
    """Source-labelled + target-unlabelled training with the adaptation loss `method`."""
    c = base_config(arg)
    target = DIRECTIONS[c.direction][1]
    c.task = "domain_adaptation"
    c.data = {"source": c.data.to_dict(), "target": domain_data(target, "train", c.direction)}
    c.adaptation = {"method": method, **options}
    return c


def _eval_data(domain: str, direction: str, split: str = "test") -> dict:
    d = domain_data(domain, split, direction)
    return {"dataset": d["name"], "split": d["split"], "pp": d["pp"]}
