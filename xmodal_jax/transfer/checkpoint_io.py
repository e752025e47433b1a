"""Read foreign weight files into flat `{name: np.ndarray}` dicts; write and read our own
converted checkpoints.

Foreign formats: PyTorch `.pth` / `.bin` (zip or legacy, through `torch_pickle`, no torch),
`safetensors` (`safetensors.numpy`) and `.npz` (big_vision). A directory is searched for
`model.safetensors`, `pytorch_model.bin`, then any single weights file.

Our converted checkpoint is one safetensors file whose tensors are named by `/`-joined Flax
paths including the collection (`params/encoder/layer_0/attn/query/kernel`,
`batch_stats/stem_norm/mean`), and whose header metadata holds one JSON object under the key
`xmodal_jax` (architecture name, overrides, preprocessing, tokenizer vocabulary).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import safetensors
import safetensors.numpy

from xmodal_jax.errors import UserError
from xmodal_jax.transfer import torch_pickle

METADATA_KEY = "xmodal_jax"
FORMAT = "xmodal_jax.checkpoint/1"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.npz")
_WEIGHT_EXTS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """`{'a': {'b': x}}` -> `{'a/b': x}` (boxed logical-axis metadata is removed)."""
    out: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    visit(nn.unbox(tree), "")
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _find_weights_file(path: str) -> str:
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(f for f in os.listdir(path) if f.endswith(_WEIGHT_EXTS))
    if len(found) == 1:
        return os.path.join(path, found[0])
    raise FileNotFoundError(
        f"No single weights file in directory {path!r} (found {found or 'none'}); pass the file "
        f"itself, e.g. {os.path.join(path, 'model.safetensors')!r}."
    )


def _state_dict_of(obj: Any, path: str) -> dict[str, np.ndarray]:
    """The tensor dict inside an unpickled torch checkpoint (`state_dict`, `model`, ...)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        sd = dict(obj)
        if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        return sd
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module", "params"):
            if key in obj:
                return _state_dict_of(obj[key], path)
    raise UserError(
        f"{path}: found no state dict (a mapping of names to tensors) in the checkpoint; top-level "
        f"keys are {list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__}. Save "
        "model.state_dict() rather than the model object."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat `{name: array}` from a `.pth`/`.bin`, `.safetensors`, `.npz` file or a directory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Weights file {path!r} does not exist.")
    if os.path.isdir(path):
        path = _find_weights_file(path)
    if path.endswith(".safetensors"):
        return dict(safetensors.numpy.load_file(path))
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except ValueError as e:  # object arrays (pickles) are refused, or not a .npz at all
            raise UserError(
                f"{path!r} cannot be read as numeric arrays ({e}); save it with np.savez and "
                "numeric arrays only (object arrays are pickles, which are never loaded)."
            ) from None
    if torch_pickle.is_torch_checkpoint(path):
        return _state_dict_of(torch_pickle.load(path), path)
    raise UserError(
        f"Unrecognised weights file {path!r}: expected a PyTorch checkpoint (.pth/.bin), "
        "a .safetensors or a .npz file."
    )


def save(
    path: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any]
) -> None:
    """Write Flax `variables` and a JSON-able `metadata` dict as one safetensors file."""
    flat = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in flatten(variables).items()}
    meta = {"format": FORMAT, **metadata}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    safetensors.numpy.save_file(flat, tmp, metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)  # never leave a half-written checkpoint under the final name


def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint written by `save` (safetensors with our metadata)."""
    path = os.fspath(path)
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    with safetensors.safe_open(path, "numpy") as f:
        return METADATA_KEY in (f.metadata() or {})


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(variables, metadata)` from a checkpoint written by `save`."""
    path = os.fspath(path)
    if not is_converted(path):
        raise UserError(
            f"{path!r} is not a converted xmodal_jax checkpoint (a .safetensors file with "
            f"'{METADATA_KEY}' metadata). Convert foreign weights first: "
            "xmodal_jax.transfer.convert.convert(SRC, DST) or `xmodal convert SRC DST`."
        )
    with safetensors.safe_open(path, "numpy") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    return unflatten(flat), meta
