"""ImageNet-C corruptions of the embedded 28x28 datasets: `animal_silhouettes_c` and
`digits_mnist_c`, one TFDS config per corruption and severity (`animal_silhouettes_c/fog_3`),
each built only when first used, like TFDS's `cifar10_corrupted`.

The 19 corruptions x 5 severities are those of Hendrycks & Dietterich (ICLR 2019): the 15 of
ImageNet-C and its 4 held-out ones (speckle noise, Gaussian blur, spatter, saturate), as
implemented by corrupt-tta 0.1.7 (MIT), which runs them with numpy 2 and scikit-image 0.26.

Protocol: each clean grey image is repeated to RGB and corrupted at its native 28x28 size with
ImageNet-C's own constants, which were set for 224x224 images, so the spatial ones (blurs,
elastic transform, frost, fog) are relatively far stronger here than on ImageNet-C; the result
is rounded to uint8 and keeps its 3 channels (28x28x3; `grey_to_rgb` makes a clean model's
input match). `saturate` barely changes a grey image (it has no saturation to scale), and
corrupt-tta's `elastic_transform` is not monotone in severity at this size (its severities 1-2
shift the image's corners by up to 22 and 45 pixels, 3-5 by up to 4). Each example has its own
seed, from the dataset, config, split and example key, so every build is the same.

Splits: `test` is the corrupted test split of the clean dataset; `train` is the corrupted train
split (all 8,000 animal silhouettes; a fixed stratified subset of 10,000 of MNIST's 50,000
training digits), for methods that adapt on unlabelled target images. Both keep their labels for
evaluation only: a method must not train on the labels of `train`, and tables must not report a
run that did.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from xmodal_jax.data import assets, builders
from xmodal_jax.errors import UserError

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform",
    "pixelate", "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
SEVERITIES = (1, 2, 3, 4, 5)
TRAIN_SUBSET_SEED = 20190506
# Fraction of pixels set to 0 or 1 by `impulse_noise` at severities 1..5 (ImageNet-C's values).
_IMPULSE_AMOUNTS = (0.03, 0.06, 0.09, 0.17, 0.27)

INSTALL = (
    "the corrupted datasets need corrupt-tta 0.1.7 and its dependencies: `pip install -e "
    "'.[shift]'` and `pip install --no-deps corrupt-tta==0.1.7` (or `make install-test`)"
)


def _corrupt_tta() -> Callable[..., np.ndarray]:
    try:
        from corrupt_tta import corrupt
    except ImportError as e:
        raise UserError(f"Cannot import corrupt_tta ({e}): {INSTALL}.") from None
    return corrupt


def example_seed(*parts: object) -> int:
    """A 32-bit seed from the parts' text (CRC-32: the same in every process and Python)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def corrupt(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One image (uint8 [H, W, 1 or 3]) corrupted, as uint8 [H, W, 3]. Deterministic in `seed`:
    corrupt-tta draws from numpy's global generator, which is seeded here and restored after;
    `impulse_noise` is done here with ImageNet-C's amounts, since the scikit-image function that
    corrupt-tta calls for it draws fresh entropy on every call."""
    if corruption not in CORRUPTIONS:
        raise UserError(f"Unknown corruption {corruption!r}; the corruptions are {CORRUPTIONS}.")
    if severity not in SEVERITIES:
        raise UserError(f"Corruption severity {severity!r}: use one of {SEVERITIES}.")
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise UserError(f"Cannot corrupt an image of shape {image.shape}: need [H, W, 1 or 3].")
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    if corruption == "impulse_noise":
        from skimage.util import random_noise

        out = 255 * random_noise(
            rgb / 255, mode="s&p", amount=_IMPULSE_AMOUNTS[severity - 1], rng=seed
        )
    else:
        fn = _corrupt_tta()
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            out = fn(rgb, severity=severity, corruption_name=corruption)
        finally:
            np.random.set_state(state)
    return np.clip(np.rint(np.asarray(out, np.float64)), 0, 255).astype(np.uint8)


def animal_silhouettes_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, images, labels) of `animal_silhouettes`'s split, keys as in its builder."""
    images, labels = assets.animal_mnist()
    is_test = builders.stratified_split(labels, builders.AnimalSilhouettes.NUM_TEST)
    keys = np.flatnonzero(is_test if split == "test" else ~is_test)
    return keys, images[keys], labels[keys]


def digits_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, images, labels) of `digits_mnist`'s split, keys as in its builder."""
    images, labels = assets.mnist()[split]
    return np.arange(len(labels)), images, labels


class _CorruptedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A clean 28x28 dataset's `test` and `train` splits under one corruption and severity."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: corrupt-tta 0.1.7, native size, RGB."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=f"{c}_{s}", description=f"{c}, severity {s} of 5.")
        for c in CORRUPTIONS
        for s in SEVERITIES
    ]
    CLEAN: str
    CLASS_NAMES: tuple[str, ...]
    CLEAN_SPLIT: Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]
    TRAIN_MAX: int | None = None  # a fixed stratified subset of the train split above this

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # ArrayRecord: random access for Grain, and writable without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"`{self.CLEAN}` under an ImageNet-C corruption (Hendrycks & "
            "Dietterich, ICLR 2019; corrupt-tta 0.1.7), 28x28x3. Labels of `train` are for "
            "evaluation only.",
            homepage="https://github.com/hendrycks/robustness",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    @property
    def corruption(self) -> tuple[str, int]:
        name, severity = self.builder_config.name.rsplit("_", 1)
        return name, int(severity)

    def _split_generators(self, dl_manager):
        del dl_manager  # made from files of installed packages
        _corrupt_tta()  # one clear error before anything is written
        return {split: self._generate_examples(split) for split in ("test", "train")}

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, clean images, labels) of a split, the train subset applied."""
        keys, images, labels = type(self).CLEAN_SPLIT(split)
        if split == "train" and self.TRAIN_MAX is not None and len(keys) > self.TRAIN_MAX:
            keep = builders.stratified_split(labels, self.TRAIN_MAX, TRAIN_SUBSET_SEED)
            keys, images, labels = keys[keep], images[keep], labels[keep]
        return keys, images, labels

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        corruption, severity = self.corruption
        for key, image, label in zip(*self.split_arrays(split), strict=True):
            seed = example_seed(self.name, corruption, severity, split, key)
            image = corrupt(image.reshape(28, 28, 1), corruption, severity, seed)
            yield int(key), {"image": image, "label": int(label)}


class AnimalSilhouettesC(_CorruptedBuilder):
    """`animal_silhouettes` under the 19 ImageNet-C corruptions x 5 severities."""

    CLEAN = "animal_silhouettes"
    CLASS_NAMES = builders.ANIMAL_NAMES
    CLEAN_SPLIT = staticmethod(animal_silhouettes_split)


class DigitsMnistC(_CorruptedBuilder):
    """`digits_mnist` under the 19 ImageNet-C corruptions x 5 severities; `train` is 10,000."""

    CLEAN = "digits_mnist"
    CLASS_NAMES = builders.DIGIT_NAMES
    CLEAN_SPLIT = staticmethod(digits_mnist_split)
    TRAIN_MAX = 10000


NAMES = ("animal_silhouettes_c", "digits_mnist_c")
