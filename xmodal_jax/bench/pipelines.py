"""Input-pipeline throughput: the Grain training pipelines of the animals and digits experiments,
with their augmentation, alone (no model), in examples per second."""

from __future__ import annotations

import time
from typing import Any

from xmodal_jax.data import pipeline

# The augmented animals pipeline of `experiments/animals/common.py` (random crop + flip at
# 112 px) and the digits pipelines of `experiments/digits/digits_common.py`, brought to the
# MobileNetV2 + DANN step's 96 px with a random crop and a flip.
ANIMALS_PP = (
    "invert|resize(128)|random_crop(112)|flip_lr|grey_to_rgb|value_range(0, 1)|normalize"
    "|keep('image', 'label')"
)
DIGITS_PP = {
    "digits_mnist5k": "value_range(0, 1)",
    "digits_uci": "value_range(0, 1, in_hi=16)",
}
DIGITS_AUG = "|resize(104)|random_crop(96)|flip_lr|grey_to_rgb|keep('image', 'label')"


def _rate(iterator: Any, examples_per_batch: int, batches: int) -> float:
    # From the first batch on: Grain reads ahead in threads, so a short run that skipped the
    # first batch would time batches already prepared.
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return examples_per_batch * batches / (time.perf_counter() - start)


def measure(batch: int, batches: int) -> dict[str, float]:
    """Examples/s of the animals pipeline and of the paired digits (source + target) one."""
    animals = pipeline.train_iterator(
        {"name": "animal_silhouettes", "split": "train", "pp": ANIMALS_PP},
        batch_size=batch,
        seed=0,
    )
    digits = pipeline.paired_iterator(
        {
            "name": "digits_mnist5k",
            "split": "train",
            "pp": DIGITS_PP["digits_mnist5k"] + DIGITS_AUG,
        },
        {"name": "digits_uci", "split": "train", "pp": DIGITS_PP["digits_uci"] + DIGITS_AUG},
        batch_size=batch,
        seed=0,
    )
    return {
        "animals_examples_per_s": _rate(animals, batch, batches),
        "digits_paired_examples_per_s": _rate(digits, 2 * batch, batches),
    }
