"""Adaptation to one ImageNet-C corruption and severity from its unlabelled images.

    xmodal train --workdir workdirs/corruptions_dann_fog_3 --config \
        experiments/corruptions/adapt.py:dataset=digits_mnist,method=dann,corruption=fog,severity=3

The model and recipe of `source.py` (`common.py`), with the corrupted *train* split of
`<dataset>_c/<corruption>_<severity>` as the unlabelled target (its labels unused):
- `method=dann`, `cdan_e`, `mcc`: trained from scratch on the labelled clean `train[:90%]` and
  the unlabelled corrupted images, each method's loss of `xmodal_jax/adaptation/` at
  `weight` (default 1; a table grid chooses it on `source_val`);
- `method=shot`: source-free (Liang et al., ICML 2020; `experiments/digits/shot.py`): the
  feature extractor of a `source.py` run of the same dataset and seed (`source=` its workdir)
  adapted on the corrupted images alone for 1,000 steps, its classifier frozen.
`eval/target/accuracy` is the corrupted test split; `source_val` the clean held-out images.
One run per corruption and severity: 95 x methods x seeds runs make the table's adaptation rows
(`experiments/tables/corruptions.py`), several CPU-days; its `--dry-run` prints them for a
cluster.
"""

from experiments.corruptions.common import PP, SOURCE_TRAIN, base_config, corrupted, eval_data
from xmodal_jax.config import parse_arg
from xmodal_jax.errors import UserError

METHODS = ("dann", "cdan_e", "mcc", "shot")


def get_config(arg=None):
    args = parse_arg(
        arg,
        dataset="digits_mnist",
        seed=0,
        method="dann",
        corruption="fog",
        severity=3,
        weight=1.0,
        source="",
        steps=1000,
    )
    if args.method not in METHODS:
        raise UserError(f"method={args.method!r}: use one of {METHODS}.")
    c = base_config(args.dataset, args.seed)
    target = corrupted(args.dataset, args.corruption, args.severity)
    c.evals.target = {"type": "classification", **eval_data(target, "test")}
    target_train = {"name": target, "split": "train", "pp": PP}
    if args.method == "shot":
        if not args.source:
            raise UserError(
                "method=shot adapts a trained source model: add source=<workdir of an "
                "experiments/corruptions/source.py run of the same dataset and seed>."
            )
        c.task = "source_free"
        c.source = {"workdir": args.source, "step": None}
        c.data = target_train
        c.shot = {"beta": 0.3, "im_weight": 1.0}
        c.schedule = [("head/.*", None), (".*", "base")]
        c.total_steps = c.checkpoint_every = args.steps
        return c
    c.task = "domain_adaptation"
    c.data = {"source": {"name": args.dataset, "split": SOURCE_TRAIN, "pp": PP},
              "target": target_train}  # fmt: skip
    c.adaptation = {"method": args.method, "weight": args.weight}
    return c
