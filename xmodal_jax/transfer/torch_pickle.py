"""Read PyTorch `.pth` / `.bin` checkpoints into numpy without torch, safely.

A torch checkpoint is a pickle, and unpickling can call any importable function. The
`RestrictedUnpickler` here resolves only tensor rebuild functions, storage types,
`collections.OrderedDict` and plain containers; any other global (`os.system`, ...) raises
`UnsafePickleError` before anything runs. Storages are read straight into numpy arrays.

Both container formats are handled:
- zip (torch >= 1.6): `<root>/data.pkl` plus one raw little-endian file per storage,
  `<root>/data/<key>`;
- legacy (non-zip): four pickles in a row (magic number, protocol version, system info, the
  object) then the list of storage keys and, per key, an int64 element count and the raw bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from xmodal_jax.errors import UserError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """The pickle references a global that is not needed to rebuild tensors."""


@dataclasses.dataclass
class _Storage:
    key: str
    dtype: Any
    numel: int
    offset: int = 0  # element offset into the root storage (legacy storage views)


@dataclasses.dataclass
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_):
    del requires_grad, hooks
    storage = dataclasses.replace(storage, dtype=dtype)
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    del new_type, state
    return func(*args)


class _Marker:
    """Stands for a class (`torch.Tensor`, `Parameter`) that is named but never instantiated."""

    def __init__(self, name: str):
        self.name = name


def _encode(text: str, encoding: str = "latin1") -> bytes:
    return text.encode(encoding)  # protocol-2 pickles spell `bytes` as `_codecs.encode`


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode,
}
_ALLOWED.update({("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): dtype for name, dtype in TORCH_DTYPES.items()})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles torch checkpoints with a closed allow-list of globals (see module doc)."""

    def __init__(self, file: BinaryIO, source: str = "<stream>"):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafePickleError(
            f"Refusing to load {self.source}: its pickle references the global '{module}.{name}', "
            "which is not a tensor rebuild function, storage type, OrderedDict or plain container. "
            "A weights file needs nothing else, so this file may run code when unpickled. If you "
            "trust it, re-save its state dict with safetensors (torch.load + "
            "safetensors.torch.save_file) in an environment that has torch, and load that."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(
                f"Refusing to load {self.source}: unsupported persistent id {pid!r:.80} (only "
                "tensor storages are allowed; saved modules or code are not)."
            )
        _, dtype, key, _location, numel, *view = pid
        if isinstance(dtype, _Marker) or not isinstance(dtype, type):
            raise pickle.UnpicklingError(f"{self.source}: bad storage type in {pid!r:.80}.")
        key = str(key)
        root = self.storages.setdefault(key, _Storage(key, dtype, int(numel)))
        if view and view[0] is not None:  # legacy view: (view_key, offset, view_size)
            _view_key, offset, _view_size = view[0]
            return dataclasses.replace(root, offset=int(offset))
        return root


def _materialise(obj: Any, buffers: dict[str, np.ndarray], source: str) -> Any:
    """Replace every `_Tensor` placeholder in `obj` by a numpy array."""
    if isinstance(obj, _Tensor):
        st = obj.storage
        raw = buffers[st.key]
        data = raw.view(np.dtype(st.dtype))
        offset = st.offset + obj.offset
        size, stride = obj.size, obj.stride
        if len(size) != len(stride):
            raise pickle.UnpicklingError(
                f"{source}: tensor size {size} and stride {stride} differ."
            )
        if not size or all(s > 0 for s in size):
            last = offset + sum((s - 1) * t for s, t in zip(size, stride, strict=True))
            if offset < 0 or last >= data.size:
                raise pickle.UnpicklingError(
                    f"{source}: tensor of size {size} reaches element {last} of a storage of "
                    f"{data.size}; the file is truncated or corrupt."
                )
        else:
            return np.zeros(size, data.dtype)
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=[t * item for t in stride], writeable=False
        )
        return np.array(view)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict(
            (k, _materialise(v, buffers, source)) for k, v in obj.items()
        )
    if isinstance(obj, dict):
        return {k: _materialise(v, buffers, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v, buffers, source) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, buffers, source) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("data.pkl")]
        if not pkls:
            raise pickle.UnpicklingError(
                f"{path}: a zip file without data.pkl is not a torch checkpoint."
            )
        root = pkls[0][: -len("data.pkl")]
        order = "little"
        if f"{root}byteorder" in names:
            order = zf.read(f"{root}byteorder").decode().strip()
        up = RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path)
        obj = up.load()
        buffers = {}
        for key, st in up.storages.items():
            raw = np.frombuffer(zf.read(f"{root}data/{key}"), np.uint8)
            if order == "big":
                raw = raw.view(np.dtype(st.dtype).newbyteorder(">")).astype(st.dtype).view(np.uint8)
            buffers[key] = raw
    return _materialise(obj, buffers, path)


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        header = [RestrictedUnpickler(f, path).load() for _ in range(3)]
        magic, protocol, sys_info = header
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise pickle.UnpicklingError(
                f"{path}: not a torch checkpoint (magic {magic!r:.40}, protocol {protocol!r:.40})."
            )
        little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
        up = RestrictedUnpickler(f, path)
        obj = up.load()
        keys = RestrictedUnpickler(f, path).load()
        buffers = {}
        for key in keys:
            st = up.storages[str(key)]
            (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
            dtype = np.dtype(st.dtype)
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"{path}: storage {key} is truncated.")
            arr = np.frombuffer(raw, dtype if little else dtype.newbyteorder(">"))
            buffers[str(key)] = arr.astype(dtype).view(np.uint8)
    return _materialise(obj, buffers, path)


def load(path: str | os.PathLike) -> Any:
    """Unpickle a torch checkpoint (zip or legacy) with tensors as numpy arrays."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        if f.read(2)[:1] != b"\x80":  # every pickle since protocol 2 starts with PROTO
            raise pickle.UnpicklingError(
                f"{path} is neither a zip nor a legacy torch checkpoint (tar checkpoints from "
                "torch < 0.4 are not supported; re-save the state dict with a recent torch)."
            )
    return _load_legacy(path)


def is_torch_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a torch checkpoint (zip with data.pkl, or a legacy pickle)."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("data.pkl") for n in zf.namelist())
    with open(path, "rb") as f:
        head = f.read(16)
    return head[:1] == b"\x80" and b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" in head
