"""Device mesh from config: axes (`data`, `fsdp`, `model`), one of them may be -1 (the rest)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from xmodal_jax.errors import UserError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves -1 and checks the product equals the device count."""
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise UserError(f"config.mesh has unknown axes {sorted(unknown)}; use only {AXES}.")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise UserError(f"config.mesh={dict(sizes)}: at most one axis may be -1.")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise UserError(
                f"config.mesh={dict(sizes)}: {num_devices} devices do not divide by {known}."
            )
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise UserError(
            f"config.mesh={dict(sizes)} needs {math.prod(shape)} devices but there are "
            f"{num_devices}; make the sizes multiply to {num_devices} or set one to -1."
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A `Mesh` with Auto axis types (logical-axis rules and sharding constraints need them)."""
    auto = (AxisType.Auto,) * len(AXES)
    if devices is None:
        return jax.make_mesh(mesh_shape(sizes, jax.device_count()), AXES, axis_types=auto)
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` and `fsdp`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
