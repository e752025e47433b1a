"""The glibc allocator setting the `xmodal` command starts with: transparent huge pages.

XLA:CPU allocates a train step's large buffers anew at every step; glibc serves them with fresh
`mmap`s, so every step faults in (and the kernel zeroes) its working set 4 KiB page by page.
With the glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks the kernel for
transparent huge pages (`madvise(MADV_HUGEPAGE)`) on that memory: 512 times fewer faults.
The `malloc` ablation of `xmodal bench` measures it (BENCHMARKS.md): ResNet-50 and
MobileNetV2 + DANN steps faster, LeNet + DANN level, the first updates bit-identical (where
memory comes from does not change what XLA computes).

glibc reads its tunables once, when a process starts, so `cli` (the `xmodal` program) restarts
itself once with the tunable added to `GLIBC_TUNABLES`, before anything heavy is imported; its
subprocesses (the jobs of `xmodal table`) inherit it. Nothing changes when:
- `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb` (the user's choice wins),
- `XMODAL_MALLOC_DEFAULTS=off`,
- the C library is not glibc >= 2.35, or the kernel's transparent huge pages are `never` (or
  not there): the tunable would do nothing.
Importing `xmodal_jax` from Python (a notebook, the tests) changes nothing: the process has
started. There, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...` gives the same.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OFF_ENV = "XMODAL_MALLOC_DEFAULTS"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
GLIBC_SINCE = (2, 35)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'); None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
    """glibc's (major, minor), or None where the C library is another."""
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def with_defaults(
    environ: Mapping[str, str], glibc: tuple[int, ...] | None, thp: str | None
) -> dict[str, str] | None:
    """`environ` with `SETTING` added to `GLIBC_TUNABLES`, or None where it stays as it is
    (see the module docstring)."""
    if environ.get(OFF_ENV, "").lower() in ("0", "off", "false", "no"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if f"{TUNABLE}=" in tunables or glibc is None or glibc < GLIBC_SINCE:
        return None
    if thp not in ("always", "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, SETTING]))}


def restart_with_defaults() -> None:
    """Replaces this process by the same command with `SETTING` in its environment, when
    `with_defaults` says to; returns (doing nothing) otherwise or if the restart fails."""
    env = with_defaults(os.environ, glibc_version(), thp_mode())
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # not restartable here (a frozen or embedded interpreter): run as we are
        return
