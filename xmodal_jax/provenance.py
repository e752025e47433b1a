"""What produced a run: code version, software stack, devices and the exact config.

The trainer writes this beside `summary.json` as `provenance.json`; the table tool copies it into
each run's record, so every committed figure names the commit, the versions and the machine
that made it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from xmodal_jax import xla_defaults

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the config's canonical JSON (sorted keys): equal configs, equal hashes."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_state(path: str | None = None) -> dict[str, Any]:
    """`{'commit': sha or None, 'dirty': bool or None, 'changed': [paths]}` of the checkout
    holding this package; `changed` names the tracked files with uncommitted changes, so a
    reader can tell edited code from, say, a records file being written."""
    path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ["git", "-C", path, *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is None:
        return {"commit": commit, "dirty": None}
    changed = sorted(line.split(maxsplit=1)[1] for line in status.splitlines() if line.strip())
    return {"commit": commit, "dirty": bool(changed), "changed": changed}


def versions(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """Python's version and the installed version (or None) of `PACKAGES` and `extra`."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*PACKAGES, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`; `platform.processor()` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def cpu_family(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'family F, model M' of an x86 CPU ('' elsewhere). Virtual machines often report a
    generic model name ('AMD EPYC') for processors of different generations, whose step times
    and ratios to PyTorch differ; the family and model tell them apart."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for ln in f:
                key, _, value = ln.partition(":")
                key = key.strip()
                if key in ("cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not ln.strip():
                    break  # the first processor's block only
    except OSError:
        return ""
    if "cpu family" not in fields or "model" not in fields:
        return ""
    return f"family {fields['cpu family']}, model {fields['model']}"


# The vector extensions XLA:CPU compiles for when the host has them, widest first: the same run
# on CPUs with different ones differs in its last bits (the vector width orders the sums), and
# training carries such differences into the figures.
SIMD = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sve", "SVE"), ("asimd", "NEON"))


def cpu_simd(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The widest vector extension of `SIMD` this CPU has ('' where none is known)."""
    try:
        with open(cpuinfo) as f:
            flags = next(
                set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith(("flags", "Features"))
            )
    except (OSError, StopIteration):
        return ""
    return next((name for flag, name in SIMD if flag in flags), "")


def usable_cpus() -> int:
    """Cores this process may run on. XLA:CPU sizes its thread pool by them and splits
    reductions accordingly, so the same run on 1 and on 2 cores differs in the last bits."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe(config: Mapping[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """The provenance of a run of `config` in this process."""
    import jax  # here, so that `config_hash` serves tools that never start JAX

    from xmodal_jax.models import layers, residuals

    devices = jax.devices()
    return {
        "config_hash": config_hash(config),
        "git": git_state(),
        "versions": versions(),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cpu_model": cpu_model(),
        "cpu_simd": cpu_simd(),
        "cpu_family": cpu_family(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_convolutions": xla_defaults.cpu_convolutions(),
        "cpu_depthwise": layers.cpu_depthwise(),  # what depthwise='auto' runs on CPU
        "cpu_residuals": residuals.cpu_residuals(),  # residual streams on CPU
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # malloc_defaults
        "argv": list(sys.argv if argv is None else argv),
    }
