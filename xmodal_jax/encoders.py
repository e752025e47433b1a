"""The towers `pretrained.load` returns, each with its preprocessing: `TextEncoder` (tokenise,
encode), `VisionEncoder` (resize, crop, normalise, encode, classify), and the image-text pairs
`CLIPEncoders` (softmax scoring) and `SigLIPEncoders` (sigmoid scoring with a learned bias).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.errors import UserError


def _bucket(n: int, cap: int) -> int:
    """Pad a batch of `n` to a power of two (at most `cap`) so few shapes get compiled."""
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class TextEncoder:
    """A text tower with its tokenizer: `encode(texts)` -> numpy `[N, D]`."""

    module: nn.Module
    variables: dict[str, Any]
    tokenizer: Any  # `.encode(list[str]) -> int32 [N, L]`; None if the checkpoint has none
    normalize: bool = True  # L2-normalise the pooled embedding
    name: str = ""
    batch_size: int = 64
    no_tokenizer_fix: str = ""  # how to supply the tokenizer, when the checkpoint has none

    def __post_init__(self):
        self._pooled = jax.jit(lambda v, ids: self.module.apply(v, ids)["pooled"])

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        """Token ids int32 `[N, L]` from the tower's own tokenizer."""
        if self.tokenizer is None:
            fix = self.no_tokenizer_fix or "tokenize yourself and call encode_ids(ids)"
            raise UserError(
                f"{self.name or 'This text tower'} has no tokenizer (its checkpoint carried no "
                f"vocabulary). Fix: {fix}."
            )
        return self.tokenizer.encode([texts] if isinstance(texts, str) else list(texts))

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """Pooled (and, if `normalize`, L2-normalised) embeddings of token ids `[N, L]`."""
        ids = np.asarray(ids, np.int32)
        if ids.ndim != 2:
            raise UserError(f"Token ids must be int32 [N, L], got shape {ids.shape}.")
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            n = len(chunk)
            # Drop all-padding columns (rounded to 16 to limit recompiles); masks make it exact.
            # Towers that attend to their padding (SigLIP) get the ids as they are.
            used = int(np.max(np.nonzero(chunk.any(axis=0))[0], initial=0)) + 1
            length = min(ids.shape[1], -(-used // 16) * 16)
            if getattr(self.module, "full_length_input", False):
                length = ids.shape[1]
            batch = np.zeros((_bucket(n, self.batch_size), length), np.int32)
            batch[:n] = chunk[:, :length]
            out.append(np.asarray(self._pooled(self.variables, batch), np.float32)[:n])
        emb = np.concatenate(out)
        if self.normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return emb

    def encode(self, texts: Sequence[str] | str) -> np.ndarray:
        """Embeddings `[N, D]` of `texts` (a string gives `[1, D]`)."""
        return self.encode_ids(self.tokenize(texts))


@dataclasses.dataclass
class VisionEncoder:
    """An image tower with its preprocessing: `encode(images)`, `classify(images)`.

    Preprocessing: shorter side resized (`interpolation` 'bilinear' or 'bicubic', anti-aliased)
    to `image_size / crop_fraction`, centre crop `image_size` (224 / 0.875 = 256 is the usual
    ImageNet evaluation; CLIP crops at 1.0), scaled to [0, 1], normalised by `mean` / `std`,
    NHWC float32. Sizes and offsets are rounded as torchvision's `Resize(int)` and `CenterCrop`
    round them (the longer side truncated, the crop offset rounded).
    """

    module: nn.Module
    variables: dict[str, Any]
    image_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"  # 'bilinear' | 'bicubic' (Keys, a = -0.5, as PIL)
    class_names: list[str] | None = None
    name: str = ""
    batch_size: int = 32

    def __post_init__(self):
        self._apply = jax.jit(lambda v, x: self.module.apply(v, x))

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (or float in [0, 1]) `[N, H, W, 3]` -> normalised float32 `[N, S, S, 3]`."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(
                f"Images must be [N, H, W, 3] (RGB, NHWC), got shape {images.shape}; convert "
                "grayscale with np.repeat(x[..., None], 3, -1)."
            )
        x = (
            images.astype(np.float32) / 255.0
            if images.dtype == np.uint8
            else images.astype(np.float32)
        )
        n, h, w, _ = x.shape
        short = max(1, round(self.image_size / self.crop_fraction))
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        nh, nw = max(self.image_size, nh), max(self.image_size, nw)
        method = {"bilinear": "bilinear", "bicubic": "bicubic"}.get(self.interpolation)
        if method is None:
            raise UserError(
                f"Unknown interpolation {self.interpolation!r}; choose 'bilinear' or 'bicubic'."
            )
        x = np.asarray(jax.image.resize(jnp.asarray(x), (n, nh, nw, 3), method, antialias=True))
        if method == "bicubic":  # cubic overshoot at edges, clipped as an 8-bit image is (PIL)
            x = np.clip(x, 0.0, 1.0)
        top = int(round((nh - self.image_size) / 2))
        left = int(round((nw - self.image_size) / 2))
        x = x[:, top : top + self.image_size, left : left + self.image_size]
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(
            np.float32
        )

    def _run(self, images: np.ndarray, key: str) -> np.ndarray:
        x = self.preprocess(images)
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            batch = np.zeros((_bucket(len(chunk), self.batch_size), *chunk.shape[1:]), np.float32)
            batch[: len(chunk)] = chunk
            result = self._apply(self.variables, batch)
            if key not in result:
                raise UserError(
                    f"{self.name or 'This tower'} has no classifier head (num_classes=0)."
                )
            out.append(np.asarray(result[key], np.float32)[: len(chunk)])
        return np.concatenate(out)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Pooled features `[N, D]`."""
        return self._run(images, "pooled")

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Classifier logits `[N, num_classes]`."""
        return self._run(images, "logits")


@dataclasses.dataclass
class CLIPEncoders:
    """The two towers of a CLIP checkpoint and its learned temperature."""

    image: VisionEncoder
    text: TextEncoder
    logit_scale: float  # log of the temperature multiplier

    def logits(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """`exp(logit_scale) * cos(image, text)`, `[N_images, N_texts]`."""
        zi = self.image.encode(images)
        zi = zi / np.linalg.norm(zi, axis=-1, keepdims=True)
        return float(np.exp(self.logit_scale)) * zi @ self.text.encode(texts).T

    def zeroshot_head(
        self, classes: str | Sequence[str], templates: Sequence[str] | str | None = None
    ) -> np.ndarray:
        """Zero-shot classifier `[C, D]` (unit rows) from class names x prompt templates.

        `classes`: a dataset name of `zeroshot_heads.datasets()` ('imagenet1k', 'cifar10', ...;
        its class names and templates) or a list of class names (templates default to
        ImageNet's 80). `templates`: strings with `{}` (or `{c}`) where the name goes.
        """
        from xmodal_jax import zeroshot_heads

        return zeroshot_heads.build_head(self.text.encode, classes, templates)

    def classify(self, images: np.ndarray, head: np.ndarray) -> np.ndarray:
        """Zero-shot logits `exp(logit_scale) * cos(image, head row)`, `[N_images, C]`, for a
        `head` from `zeroshot_head`; argmax is the predicted class. (SigLIP's `logit_bias`,
        the same for every class, is not added: it changes neither argmax nor softmax.)"""
        head = np.asarray(head, np.float32)
        if head.ndim != 2:
            raise UserError(
                f"A zero-shot head is [C, D], got shape {head.shape}; build it with "
                "zeroshot_head(dataset or class names)."
            )
        zi = self.image.encode(images)
        if zi.shape[1] != head.shape[1]:
            raise UserError(
                f"The head's width {head.shape[1]} is not this model's embedding width "
                f"{zi.shape[1]}; build the head with this model's zeroshot_head."
            )
        zi = zi / np.linalg.norm(zi, axis=-1, keepdims=True)
        return float(np.exp(self.logit_scale)) * zi @ head.T


@dataclasses.dataclass
class SigLIPEncoders(CLIPEncoders):
    """The two towers of a SigLIP checkpoint, its learned temperature and bias: each image-text
    pair is scored on its own, `sigmoid(logits)` being the probability that they match."""

    logit_bias: float = 0.0

    def logits_ids(self, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """`exp(logit_scale) * cos(image, text) + logit_bias`, `[N_images, N_texts]`, for token
        ids padded as SigLIP's tokenizer pads them (to the tower's `context_length`)."""
        zi = self.image.encode(images)
        zi = zi / np.linalg.norm(zi, axis=-1, keepdims=True)
        zt = self.text.encode_ids(ids)
        zt = zt / np.linalg.norm(zt, axis=-1, keepdims=True)
        return float(np.exp(self.logit_scale)) * zi @ zt.T + self.logit_bias

    def logits(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """`exp(logit_scale) * cos(image, text) + logit_bias`, `[N_images, N_texts]`."""
        return self.logits_ids(images, self.text.tokenize(texts))

    def probabilities(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """`sigmoid(logits)`: each pair's probability of matching, `[N_images, N_texts]`."""
        return 1.0 / (1.0 + np.exp(-self.logits(images, texts)))
