"""Where xmodal_jax keeps what it computes once per machine and reads again: locked-tower
features (`tasks/feature_cache.py`) and the compiled programs of a table's runs (`xmodal table`
hands its trainers JAX's persistent compilation cache); also the locks of `xmodal table`'s
records files (`locks/`)."""

from __future__ import annotations

import os
import socket

CACHE_ENV = "XMODAL_CACHE"
COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # read by JAX itself


def cache_root(root: str | None = None) -> str:
    """`root`, else `$XMODAL_CACHE`, else `~/.cache/xmodal_jax`."""
    path = root or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "xmodal_jax")
    return os.path.expanduser(path)


def compilation_cache_dir() -> str:
    """`$JAX_COMPILATION_CACHE_DIR` if set, else `<cache_root>/jax_compilation/<host name>`: one
    directory per machine, as an executable compiled for one CPU may not load on another."""
    return os.environ.get(COMPILATION_CACHE_ENV) or os.path.join(
        cache_root(), "jax_compilation", socket.gethostname()
    )
