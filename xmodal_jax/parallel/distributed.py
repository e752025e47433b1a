"""Multi-host start-up: `jax.distributed.initialize()` when the environment shows several processes.

One command runs everywhere; the environment decides (`plan`):

- explicit: `XMODAL_COORDINATOR=host:port`, `XMODAL_NUM_PROCESSES`, `XMODAL_PROCESS_ID` (and
  optionally `XMODAL_LOCAL_DEVICE_IDS=0,1,...`), as `launch/local_multiprocess.sh` sets them;
- auto: JAX's own cluster detection (Cloud TPU, SLURM, Open MPI, Kubernetes) when
  `XMODAL_DISTRIBUTED=auto`, or when the environment is unmistakably a multi-process job: a SLURM
  step with more than one task, an Open MPI job of more than one rank, a TPU slice whose
  `TPU_WORKER_HOSTNAMES` lists several hosts;
- single: anything else (or `XMODAL_DISTRIBUTED=off`): nothing is initialised.

A dead peer must not hang the others: JAX's coordination service aborts every process once a
peer has missed heartbeats for `XMODAL_HEARTBEAT_TIMEOUT` seconds (default 60), and start-up
gives up after `XMODAL_INIT_TIMEOUT` seconds (default 300) if a peer never shows up.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax

from xmodal_jax.errors import UserError

EXPLICIT_VARS = ("XMODAL_COORDINATOR", "XMODAL_NUM_PROCESSES", "XMODAL_PROCESS_ID")
DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
DEFAULT_SHUTDOWN_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process starts: `mode` is single, explicit or auto; `kwargs` go to JAX."""

    mode: str
    kwargs: dict[str, Any]
    reason: str


def _int(env: Mapping[str, str], name: str, default: int | None = None, low: int = 0) -> int:
    text = env.get(name)
    if text is None or text == "":
        if default is None:
            raise UserError(f"${name} is not set; set it to an integer >= {low}.")
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"${name}={text!r} is not an integer; set an integer >= {low}.") from None
    if value < low:
        raise UserError(f"${name}={value} is below {low}; set an integer >= {low}.")
    return value


def _timeouts(env: Mapping[str, str]) -> dict[str, int]:
    return {
        "initialization_timeout": _int(env, "XMODAL_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S, 1),
        "heartbeat_timeout_seconds": _int(
            env, "XMODAL_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT_S, 1
        ),
        "shutdown_timeout_seconds": _int(
            env, "XMODAL_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S, 1
        ),
    }


def _local_device_ids(env: Mapping[str, str]) -> dict[str, list[int]]:
    text = env.get("XMODAL_LOCAL_DEVICE_IDS", "").strip()
    if not text:
        return {}
    try:
        return {"local_device_ids": [int(t) for t in text.split(",")]}
    except ValueError:
        raise UserError(
            f"$XMODAL_LOCAL_DEVICE_IDS={text!r} is not a comma-separated list of integers; "
            "set e.g. 0,1,2,3 or unset it."
        ) from None


def _cluster(env: Mapping[str, str]) -> str | None:
    """Why the environment is a multi-process job JAX can detect by itself, or None."""
    if env.get("SLURM_STEP_ID") is not None and _int(env, "SLURM_NTASKS", 1, 1) > 1:
        return f"SLURM step of {env['SLURM_NTASKS']} tasks"
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE", 1, 1) > 1:
        return f"Open MPI job of {env['OMPI_COMM_WORLD_SIZE']} ranks"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU slice of {len(hosts)} hosts"
    return None


def plan(env: Mapping[str, str]) -> Plan:
    """Reads the environment and decides how to start; raises UserError on bad values."""
    switch = env.get("XMODAL_DISTRIBUTED", "").strip().lower()
    if switch not in ("", "auto", "off"):
        raise UserError(
            f"$XMODAL_DISTRIBUTED={env['XMODAL_DISTRIBUTED']!r} is unknown; set 'auto' "
            "(JAX's cluster detection), 'off' (one process) or unset it."
        )
    if switch == "off":
        return Plan("single", {}, "XMODAL_DISTRIBUTED=off")
    given = [v for v in EXPLICIT_VARS if env.get(v)]
    if given:
        missing = [v for v in EXPLICIT_VARS if v not in given]
        if missing:
            raise UserError(
                f"{', '.join('$' + v for v in given)} set but {', '.join(missing)} not; "
                f"set all of {', '.join(EXPLICIT_VARS)} or none."
            )
        coordinator = env["XMODAL_COORDINATOR"].strip()
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(
                f"$XMODAL_COORDINATOR={coordinator!r} is not host:port; set e.g. 10.0.0.1:1234."
            )
        count = _int(env, "XMODAL_NUM_PROCESSES", low=1)
        index = _int(env, "XMODAL_PROCESS_ID")
        if index >= count:
            raise UserError(
                f"$XMODAL_PROCESS_ID={index} is not below $XMODAL_NUM_PROCESSES={count}; "
                f"process ids run from 0 to {count - 1}."
            )
        kwargs = {
            "coordinator_address": coordinator,
            "num_processes": count,
            "process_id": index,
            **_local_device_ids(env),
            **_timeouts(env),
        }
        return Plan("explicit", kwargs, f"coordinator {coordinator}")
    reason = "XMODAL_DISTRIBUTED=auto" if switch == "auto" else _cluster(env)
    if reason is None:
        return Plan("single", {}, "no multi-process environment")
    return Plan("auto", {**_local_device_ids(env), **_timeouts(env)}, reason)


def initialize(env: Mapping[str, str] | None = None) -> Plan:
    """Starts `jax.distributed` as `plan(env or os.environ)` says; call before any JAX work."""
    p = plan(os.environ if env is None else env)
    if p.mode == "single" or jax.distributed.is_initialized():
        return p
    # JAX aborts the process itself when a peer never shows up or dies; this line gives context.
    print(
        f"xmodal: starting jax.distributed ({p.reason}); waiting up to "
        f"{p.kwargs['initialization_timeout']} s for every process",
        file=sys.stderr,
        flush=True,
    )
    try:
        jax.distributed.initialize(**p.kwargs)
    except RuntimeError as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"jax.distributed.initialize failed ({p.reason}): {first_line}. Check that every "
            "process started with the same coordinator and process count, and that nothing "
            "ran JAX before it."
        ) from None
    print(
        f"xmodal: process {jax.process_index()} of {jax.process_count()} ({p.reason}), "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices",
        file=sys.stderr,
        flush=True,
    )
    return p
