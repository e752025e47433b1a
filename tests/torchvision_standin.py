"""Stand-ins for `torchvision`, for the oracle subprocesses only (`timm_oracle.py`).

timm imports torchvision at import time (FrozenBatchNorm2d, transforms, datasets), and
torchvision has no build for the CPU torch 2.13.0 installed here. `install()` (when `import
torchvision` fails) puts a finder on `sys.meta_path` that answers every `torchvision.*` import
with an empty package whose attributes are stand-in classes: they can be named, subclassed,
compared and have attributes read (`InterpolationMode.BICUBIC`), but making one raises. What
the oracles run (model construction, forward passes) uses none of them. Never imported by the
test process itself, where transformers' own check for torchvision would see them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


class _StandInMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__qualname__}.{name}")


def _stand_in(name: str) -> type:
    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"torchvision is not installed; {name} is a stand-in")

    return _StandInMeta(name, (), {"__init__": refuse})


class _Package(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stand_in(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _Package(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__version__ = "0.0+standin"


def install() -> bool:
    """Answer `torchvision` imports with stand-ins if it cannot be imported; True if it did."""
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    sys.meta_path.insert(0, _Finder())
    return True
