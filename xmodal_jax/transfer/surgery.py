"""Load pretrained variables into a model of another shape, explicitly.

`merge(target, loaded, reinit=..., skip=...)` takes every leaf of `target` (a freshly
initialised model's variables) from `loaded`, except:
- leaves whose `/`-joined path (with collection, e.g. `params/head/kernel`) matches a `reinit`
  regex keep their fresh initialisation (a new classifier head);
- loaded leaves matching a `skip` regex are dropped (an old head, a pooler);
- ViT position embeddings of another grid are resized bilinearly, the cls row kept;
- layers stacked by `nn.scan` (`.../layers/...`) and unstacked (`.../layer_3/...`) are converted
  to the target's layout.
Anything else that does not fit raises `CheckpointMismatchError` listing every missing,
unexpected and mis-shaped leaf at once, with the options that would explain them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.errors import UserError
from xmodal_jax.models import transformer
from xmodal_jax.transfer import checkpoint_io

POSEMB = r"(^|/)pos_embedding$"
_UNSTACKED = re.compile(r"^(.*/)layer_(\d+)(/.*)$")
_STACKED = re.compile(r"^(.*/)layers(/.*)$")


class CheckpointMismatchError(UserError):
    """Loaded variables do not fit the target model and no option explains why."""


def stack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`.../layer_{i}/rest` leaves -> one `.../layers/rest` leaf stacked on a new axis 0."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for path, value in flat.items():
        m = _UNSTACKED.match(path)
        if m:
            groups.setdefault(f"{m.group(1)}layers{m.group(3)}", {})[int(m.group(2))] = value
        else:
            out[path] = value
    for path, by_index in groups.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointMismatchError(
                f"Cannot stack {path}: layer indices {sorted(by_index)} are not 0..n-1."
            )
        out[path] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
    return out


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `stack_layers`."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        m = _STACKED.match(path)
        if m:
            for i in range(value.shape[0]):
                out[f"{m.group(1)}layer_{i}{m.group(2)}"] = value[i]
        else:
            out[path] = value
    return out


def _match_layout(source: dict[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    src_unstacked = any(_UNSTACKED.match(k) for k in source)
    src_stacked = any(_STACKED.match(k) for k in source)
    if src_unstacked and any(_STACKED.match(k) for k in target):
        return stack_layers(source)
    if src_stacked and any(_UNSTACKED.match(k) for k in target):
        return unstack_layers(source)
    return source


def _num_prefix(n: int) -> int | None:
    """0 or 1 prefix rows so that the rest of `n` rows is a square grid (None if neither)."""
    for prefix in (0, 1):
        if n - prefix > 0 and math.isqrt(n - prefix) ** 2 == n - prefix:
            return prefix
    return None


def _resize_posemb(src: np.ndarray, tgt_shape: tuple[int, ...]) -> np.ndarray | None:
    if src.ndim != 3 or len(tgt_shape) != 3 or src.shape[2] != tgt_shape[2]:
        return None
    ps, pt = _num_prefix(src.shape[1]), _num_prefix(tgt_shape[1])
    if ps is None or ps != pt:
        return None
    side = math.isqrt(tgt_shape[1] - pt)
    return np.asarray(transformer.resize_posemb(jnp.asarray(src), (side, side), pt))


def merge(
    target: Mapping[str, Any],
    loaded: Mapping[str, Any],
    *,
    reinit: Sequence[str] = (),
    skip: Sequence[str] = (),
    resize: str | None = POSEMB,
    source: str = "the checkpoint",
) -> dict[str, Any]:
    """`target`'s variables with values from `loaded` (see module doc). Regexes are searched
    (`re.search`) in `/`-joined paths that start with the collection name (`params/...`)."""
    tflat = checkpoint_io.flatten(target)
    sflat = _match_layout(checkpoint_io.flatten(loaded), tflat)
    hit = lambda pats, path: any(re.search(p, path) for p in pats)

    result, missing, misshaped, resized, reinitialised = {}, [], [], [], []
    for path, init in tflat.items():
        if hit(reinit, path):
            result[path] = init
            reinitialised.append(path)
            continue
        if path not in sflat:
            missing.append(f"{path} {tuple(init.shape)}")
            continue
        value = np.asarray(sflat[path])
        if value.shape != tuple(init.shape):
            new = (
                _resize_posemb(value, tuple(init.shape))
                if resize and re.search(resize, path)
                else None
            )
            if new is None:
                misshaped.append(f"{path}: {source} {value.shape} vs model {tuple(init.shape)}")
                continue
            resized.append(path)
            value = new
        result[path] = jnp.asarray(value, dtype=init.dtype)
    unexpected = [
        f"{p} {tuple(np.shape(v))}" for p, v in sflat.items() if p not in tflat and not hit(skip, p)
    ]

    if missing or unexpected or misshaped:
        lines = [f"Cannot load {source} into the model:"]
        for title, items in (
            ("missing from the checkpoint", missing),
            ("unexpected (not in the model)", unexpected),
            ("mis-shaped", misshaped),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {x}" for x in items)
        lines.append(
            "Fix: pass reinit=[regex] for parameters the model should initialise itself (a new "
            "head), skip=[regex] for checkpoint entries it should ignore, or build the model with "
            "the checkpoint's architecture options."
        )
        raise CheckpointMismatchError("\n".join(lines))

    merged = checkpoint_io.unflatten(result)
    return _rebox(target, merged)


def _rebox(target: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Put logical-axis boxes of `target` (if any) around the matching leaves of `values`."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    target = jax.tree.map(lambda x: x, dict(target), is_leaf=is_box)
    return jax.tree.map(
        lambda t, v: t.replace_boxed(v) if is_box(t) else v, target, values, is_leaf=is_box
    )


def init_from(
    target: Mapping[str, Any],
    path: str,
    *,
    reinit: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """`merge` with the variables of a converted checkpoint file (`convert.convert` output)."""
    loaded, _ = checkpoint_io.load(path)
    return merge(target, loaded, reinit=reinit, skip=skip, source=path)
