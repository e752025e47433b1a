"""The train step: the state it updates, its initialisation on a mesh, the step itself (with
gradient accumulation) and its ahead-of-time compilation; the loop is `trainer`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # non-trained collections, e.g. batch_stats
    opt_state: Any
    rng: jax.Array  # key data of the base key; step s uses fold_in(key, s)


def check_batch(config, mesh) -> int:
    """The micro-batch count; the batch must split evenly over it and the batch axes."""
    accum = int(config.get("grad_accum_steps", 1) or 1)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if accum < 1 or config.batch_size % (accum * shards):
        raise UserError(
            f"batch_size={config.batch_size} must be a multiple of grad_accum_steps={accum} x "
            f"the {shards} batch shards (mesh data x fsdp); change one of them."
        )
    return accum


def init_state(config, task, tx, mesh, sample_batch) -> tuple[Any, Any]:
    """`(init_fn, abstract_state)`: a jitted `batch -> TrainState` placed on `mesh`, and the
    state's shapes with their shardings (the restore target)."""
    key = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

    def boxed_init(batch):
        variables = dict(task.init(init_rng, batch))
        params = variables.pop("params")
        opt_state = tx.init(params)  # on annotated params, so moments keep the annotations
        return TrainState(jnp.int32(0), params, variables, opt_state, jax.random.key_data(step_rng))

    boxed = jax.eval_shape(boxed_init, sample_batch)
    shardings = sharding.from_config(config, boxed, mesh)
    init_fn = jax.jit(lambda b: nn.unbox(boxed_init(b)), out_shardings=shardings)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return init_fn, abstract


def _loss_and_grads(task, params, model_state, batch, rng, progress, accum: int):
    """`task.loss` and its gradient; with `accum` > 1, averaged over that many micro-batches
    (rows i, i + accum, ... of each device's shard) run one after the other."""
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    if accum == 1:
        return grad_fn(params, model_state, batch, rng, progress)
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    def micro(carry, inputs):
        model_state, total = carry
        i, mb = inputs
        (loss, (model_state, aux)), g = grad_fn(
            params, model_state, mb, jax.random.fold_in(rng, i), progress
        )
        return (model_state, jax.tree.map(jnp.add, total, g)), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (model_state, grads), (losses, aux) = jax.lax.scan(
        micro, (model_state, zeros), (jnp.arange(accum), jax.tree.map(split, batch))
    )
    grads = jax.tree.map(lambda g: g / accum, grads)
    return (losses.mean(), (model_state, jax.tree.map(jnp.mean, aux))), grads


def make_train_step(task, tx: optax.GradientTransformation, lr_fn, total: int, accum: int = 1):
    """`(state, batch) -> (state, metrics)`: one optimiser step on the task's loss."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        progress = state.step / total
        (loss, (model_state, aux)), grads = _loss_and_grads(
            task, state.params, state.model_state, batch, rng, progress, accum
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
        )
        logs = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_fn(state.step)}
        return new_state, {f"train/{k}": v for k, v in {**logs, **aux}.items()}

    return train_step


def compile_train_step(config, task, tx, lr_fn, abstract, mesh, sample_batch):
    """The train step jitted with the state's shardings, donated state, batch sharded over
    (`data`, `fsdp`), compiled ahead of time for `sample_batch`'s shapes."""
    return lower_train_step(config, task, tx, lr_fn, abstract, mesh, sample_batch).compile()


def lower_train_step(config, task, tx, lr_fn, abstract, mesh, sample_batch):
    """`compile_train_step`'s program, lowered and not yet compiled (`jax.stages.Lowered`)."""
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    step = make_train_step(task, tx, lr_fn, config.total_steps, check_batch(config, mesh))
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )
    return jitted.lower(abstract, sample_batch)


def flops(compiled) -> float | None:
    """FLOPs of one step summed over devices, from XLA's cost analysis (None if unknown)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = (cost or {}).get("flops")
    return float(flops) * jax.device_count() if flops and flops > 0 else None


class StepHistory:
    """Per-step metrics kept on device until needed; checked finite, step by step, on fetch."""

    def __init__(self):
        self.pending, self.fetched = [], []

    def add(self, step: int, values: dict) -> None:
        self.pending.append((step, values))

    def fetch(self, last_good: int | None) -> None:
        for step, values in jax.device_get(self.pending):
            bad = {k: float(v) for k, v in values.items() if not np.all(np.isfinite(v))}
            if bad:
                kept = "none" if last_good is None else f"step {last_good}"
                raise FloatingPointError(
                    f"Non-finite training metrics at step {step}: {bad}. Stopped; the last "
                    f"good checkpoint ({kept}) is kept. Lower config.lr or set "
                    "config.grad_clip_norm."
                )
            self.fetched.append(values)
        self.pending = []

    def mean(self) -> dict[str, float]:
        out = {k: float(np.mean([v[k] for v in self.fetched])) for k in self.fetched[0]}
        self.fetched = []
        return out
