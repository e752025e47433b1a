"""The XLA:CPU setting this project makes its default, put in `XLA_FLAGS` before JAX starts.

jaxlib 0.10 and 0.11 hand convolutions on CPU to the YNNPACK library by default; with
`--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION` XLA runs them
itself, and the convolutional train steps of `xmodal bench` ran faster that way, or level, on
both (the `cpu_backends` ablations in BENCHMARKS.md: step times, and the first updates against
XLA's default, which differ by float32 summation order). So `import xmodal_jax` adds the flag,
unless:
- `XLA_FLAGS` already sets `--xla_cpu_experimental_ynn_fusion_type` (the user's choice wins;
  `=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION` keeps XLA's default),
- `XMODAL_XLA_DEFAULTS=off`, or
- the installed jaxlib is not a release it was measured with (the flag is experimental; an
  unknown flag in `XLA_FLAGS` stops XLA).
The flag only concerns CPU. It takes effect if JAX has not started its backend yet, which is the
case when `xmodal_jax` is imported before any JAX computation runs (the `xmodal` command does);
imported later (a notebook that ran JAX first), it leaves `XLA_FLAGS` alone, so that they, and
the provenance read from them, still say what XLA runs with.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import MutableMapping

NAME = "--xla_cpu_experimental_ynn_fusion_type"
CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
FLAG = f"{NAME}=-{CONVOLUTIONS}"
OFF_ENV = "XMODAL_XLA_DEFAULTS"
JAXLIB_RELEASES = ("0.10.", "0.11.")  # measured with these (prefixes of jaxlib's version)


def _jaxlib_measured() -> bool:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    return version.startswith(JAXLIB_RELEASES)


def _backend_started() -> bool:
    """Whether JAX has created its backends (and XLA read its flags) in this process."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public query; the module is loaded with jax

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started else bool(getattr(xla_bridge, "_backends", None))


def apply(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Adds `FLAG` to `environ['XLA_FLAGS']` (see the module docstring); whether it did."""
    flags = environ.get("XLA_FLAGS", "")
    if environ.get(OFF_ENV, "").lower() in ("0", "off", "false", "no"):
        return False
    if NAME in flags or not _jaxlib_measured() or _backend_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


def cpu_convolutions(environ: MutableMapping[str, str] = os.environ) -> str:
    """Who runs convolutions on CPU under `environ`'s `XLA_FLAGS`: 'xla' when the last setting
    of the flag leaves YNNPACK's convolutions out, else 'ynnpack' (XLA's default)."""
    value = None
    for token in environ.get("XLA_FLAGS", "").split():
        if token.startswith(f"{NAME}="):
            value = token.split("=", 1)[1]
    if value is None:
        return "ynnpack"
    items = value.split(",")
    if all(i[:1] in "+-" and i for i in items):  # changes to XLA's default list
        return "xla" if f"-{CONVOLUTIONS}" in items else "ynnpack"
    return "ynnpack" if CONVOLUTIONS in items else "xla"  # the list itself
