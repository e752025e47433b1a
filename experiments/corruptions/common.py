"""Shared settings of the corruption benchmarks: a clean 28x28 dataset and its ImageNet-C
corruptions (`xmodal_jax/data/corruptions.py`: `<dataset>_c/<corruption>_<severity>`).

The model and recipe are the digits ones (`experiments/digits/digits_common.py`): LeNet with a
256-wide bottleneck, here with BatchNorm (AdaBN, TENT and SHOT adapt its statistics or affine
parameters), SGD with Nesterov momentum, 2,000 steps of batch 64, on 3-channel input (the
corrupted images are RGB; `grey_to_rgb` repeats a clean grey one). The source is trained on
`train[:90%]` of the clean dataset; `train[90%:]` is its validation split (`source_val`, the
only metric that chooses anything); the corrupted *test* split is reported, never used to
choose, and the corrupted *train* split (unlabelled) is what adaptation sees.
"""

import ml_collections

from experiments.digits.digits_common import base_config as digits_config
from xmodal_jax.data.corruptions import CORRUPTIONS, SEVERITIES
from xmodal_jax.errors import UserError

DATASETS = ("digits_mnist", "animal_silhouettes")
PP = "value_range(0, 1)|grey_to_rgb|keep('image', 'label')"
SOURCE_TRAIN, SOURCE_VAL = "train[:90%]", "train[90%:]"


def check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise UserError(f"dataset={name!r}: use one of {DATASETS}.")
    return name


def corrupted(dataset: str, corruption: str, severity: int) -> str:
    """The TFDS name of one corruption and severity of `dataset`."""
    if corruption not in CORRUPTIONS:
        raise UserError(f"corruption={corruption!r}: use one of {CORRUPTIONS}.")
    if int(severity) not in SEVERITIES:
        raise UserError(f"severity={severity}: use one of {SEVERITIES}.")
    return f"{dataset}_c/{corruption}_{int(severity)}"


def eval_data(name: str, split: str) -> dict:
    return {"dataset": name, "split": split, "pp": PP}


def base_config(dataset: str, seed: int) -> ml_collections.ConfigDict:
    """The digits recipe (`digits_common.base_config`) on the clean `dataset`, LeNet with
    BatchNorm, with the clean evaluators."""
    c = digits_config(f"seed={seed}")
    del c["direction"]
    c.dataset = check_dataset(dataset)
    c.model.norm = "batch"
    c.data = {"name": dataset, "split": SOURCE_TRAIN, "pp": PP}
    c.evals = {
        "source_val": {"type": "classification", **eval_data(dataset, SOURCE_VAL)},
        "source": {"type": "classification", **eval_data(dataset, "test")},
    }
    return c
