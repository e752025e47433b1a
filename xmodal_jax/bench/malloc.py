"""Ablation `malloc`: the train steps with and without the allocator setting of `xmodal`.

`default` runs with glibc's own allocator settings, `hugetlb` with `malloc_defaults.SETTING`
(transparent huge pages for malloc's memory), the setting the `xmodal` program starts with.
glibc reads it once, at process start, so each runs in a process of its own
(`backends.compare`: alternating, round after round; peak resident memory beside the step, and
the first update against `default`'s, which is expected to be equal bit for bit).
"""

from __future__ import annotations

import os
from typing import Any

from xmodal_jax import malloc_defaults
from xmodal_jax.bench import backends

VARIANTS = ("default", "hugetlb")


def env_for(variant: str) -> dict[str, str]:
    """This process's environment, `GLIBC_TUNABLES` without the setting (`default`) or with it
    (`hugetlb`), the user's other tunables kept."""
    env = dict(os.environ)
    kept = [
        t
        for t in env.get("GLIBC_TUNABLES", "").split(":")
        if t and not t.startswith(f"{malloc_defaults.TUNABLE}=")
    ]
    if variant == "hugetlb":
        kept.append(malloc_defaults.SETTING)
    env.pop("GLIBC_TUNABLES", None)
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    return env


def ablation(args, workloads: tuple[str, ...] = backends.WORKLOADS) -> dict[str, Any]:
    """`backends.compare` over `VARIANTS`, with the machine's transparent huge page mode and
    glibc version (the setting does nothing without both)."""
    envs = {variant: env_for(variant) for variant in VARIANTS}
    glibc = malloc_defaults.glibc_version()
    return {
        "tunables": {v: envs[v].get("GLIBC_TUNABLES", "") for v in VARIANTS},
        "thp_mode": malloc_defaults.thp_mode(),
        "glibc": ".".join(map(str, glibc)) if glibc else None,
        **backends.compare(envs, args, workloads),
    }
