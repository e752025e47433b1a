"""PyTorch -> Flax tensor layouts, and a state dict that tracks which entries were used.

PyTorch `Linear.weight` is `[out, in]` (`y = x W^T`), ours `[in, out]`; conv weights are
`OIHW`, ours `HWIO`; attention projections are split per head: `[D, H, hd]` in, `[H, hd, D]`
out. Converters read every source tensor through `StateDict`, and `StateDict.finish` fails on
entries that no rule consumed, so no weight is dropped silently.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping

import numpy as np

from xmodal_jax.errors import UserError


class ConversionError(UserError):
    """A source checkpoint does not have the layout its converter expects."""


class StateDict:
    """A flat `{name: array}` whose reads are recorded."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, prefix: str = ""):
        self.tensors = dict(tensors)
        self.source = source
        self.prefix = prefix  # e.g. 'bert.' when the model was saved with a task head
        self.used: set[str] = set()

    def with_prefix(self, prefix: str) -> StateDict:
        """The same tensors (and record of reads) under another key prefix."""
        other = copy.copy(self)
        other.prefix = prefix
        return other

    def has(self, key: str) -> bool:
        return self.prefix + key in self.tensors

    def __call__(self, key: str) -> np.ndarray:
        full = self.prefix + key
        if full not in self.tensors:
            close = difflib.get_close_matches(full, list(self.tensors), n=3)
            raise ConversionError(
                f"{self.source}: expected tensor {full!r} is missing"
                + (f" (closest: {', '.join(close)})" if close else "")
                + "; the file does not have the layout of the detected format."
            )
        self.used.add(full)
        return np.asarray(self.tensors[full])

    def count(self, pattern: str) -> int:
        """Number of distinct integers `N` for which `pattern.format(N)` names a tensor."""
        rx = re.compile(
            "^" + re.escape(self.prefix + pattern).replace(r"\{\}", r"(\d+)") + r"(\.|$)"
        )
        return len({m.group(1) for k in self.tensors if (m := rx.match(k))})

    def ignore(self, patterns: Iterable[str]) -> None:
        """Mark entries matching any regex as deliberately unused."""
        pats = [re.compile(p) for p in patterns]
        self.used.update(k for k in self.tensors if any(p.search(k) for p in pats))

    def finish(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            shown = ", ".join(f"{k} {tuple(self.tensors[k].shape)}" for k in left[:20])
            more = f" and {len(left) - 20} more" if len(left) > 20 else ""
            raise ConversionError(
                f"{self.source}: {len(left)} tensor(s) were not converted: {shown}{more}. The "
                "checkpoint has parts this architecture does not (or a variant not supported)."
            )


def linear(sd: StateDict, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": sd(f"{prefix}.weight").T}
    if bias:
        out["bias"] = sd(f"{prefix}.bias")
    return out


def conv(sd: StateDict, prefix: str, bias: bool = False) -> dict[str, np.ndarray]:
    out = {"kernel": sd(f"{prefix}.weight").transpose(2, 3, 1, 0)}
    if bias:
        out["bias"] = sd(f"{prefix}.bias")
    return out


def layer_norm(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
    # Old BERT checkpoints name LayerNorm parameters gamma / beta.
    if sd.has(f"{prefix}.gamma"):
        return {"scale": sd(f"{prefix}.gamma"), "bias": sd(f"{prefix}.beta")}
    return {"scale": sd(f"{prefix}.weight"), "bias": sd(f"{prefix}.bias")}


def batch_norm(sd: StateDict, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(params, batch_stats)` of a BatchNorm; `num_batches_tracked` is not needed."""
    sd.ignore([re.escape(f"{sd.prefix}{prefix}.num_batches_tracked") + "$"])
    params = {"scale": sd(f"{prefix}.weight"), "bias": sd(f"{prefix}.bias")}
    stats = {"mean": sd(f"{prefix}.running_mean"), "var": sd(f"{prefix}.running_var")}
    return params, stats


def heads_in(w: np.ndarray, b: np.ndarray | None, num_heads: int) -> dict[str, np.ndarray]:
    """Torch `[H*hd, D]` projection -> `{'kernel': [D, H, hd], 'bias': [H, hd]}`."""
    out_dim, d = w.shape
    if out_dim % num_heads:
        raise ConversionError(
            f"Projection of {out_dim} outputs does not split into {num_heads} heads."
        )
    hd = out_dim // num_heads
    out = {"kernel": w.T.reshape(d, num_heads, hd)}
    if b is not None:
        out["bias"] = b.reshape(num_heads, hd)
    return out


def heads_out(w: np.ndarray, b: np.ndarray | None, num_heads: int) -> dict[str, np.ndarray]:
    """Torch `[D, H*hd]` output projection -> `{'kernel': [H, hd, D], 'bias': [D]}`."""
    d, in_dim = w.shape
    out = {"kernel": w.T.reshape(num_heads, in_dim // num_heads, d)}
    if b is not None:
        out["bias"] = b
    return out


def put(flat: dict[str, np.ndarray], prefix: str, leaves: Mapping[str, np.ndarray]) -> None:
    """`flat[prefix/name] = leaf` for every leaf."""
    for name, value in leaves.items():
        flat[f"{prefix}/{name}"] = value
