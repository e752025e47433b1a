"""The trainer: one jitted step over a device mesh, Orbax checkpoints, evaluators, logs.

`train_and_evaluate(config, workdir)` resumes from the latest checkpoint in `workdir` if there
is one. What is trained (model, input, loss) comes from the task (`xmodal_jax.train.tasks`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.train import checkpoint, evaluators, metrics, optim, plots, tasks


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # non-trained collections, e.g. batch_stats
    opt_state: Any


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _peek(iterator):
    """The next batch, leaving the iterator where it was."""
    state = iterator.get_state()
    batch = next(iterator)
    iterator.set_state(state)
    return batch


def _initial_state(config, task, tx, mesh, sample_batch, ckpt, train_iter):
    """Fresh state, or the latest checkpoint (with the data iterator) restored onto `mesh`."""
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)

    def init(rng, batch):
        variables = task.init(rng, batch)
        params = variables.pop("params")
        return TrainState(jnp.int32(0), params, variables, tx.init(params))

    shapes = jax.eval_shape(init, init_rng, sample_batch)
    shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), shapes)
    latest = ckpt.latest_step()
    if latest is None:
        return jax.jit(init, out_shardings=shardings)(init_rng, sample_batch), train_iter, 0
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    state, train_iter = ckpt.restore(latest, target, train_iter)
    return state, train_iter, latest


def make_train_step(task, tx: optax.GradientTransformation, lr_fn, step_rng: jax.Array, total: int):
    """`(state, batch) -> (state, metrics)`: one optimiser step on the task's loss."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(step_rng, state.step)
        progress = state.step / total
        grad_fn = jax.value_and_grad(task.loss, has_aux=True)
        (loss, (model_state, aux)), grads = grad_fn(
            state.params, state.model_state, batch, rng, progress
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, model_state, opt_state)
        logs = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_fn(state.step)}
        return new_state, {f"train/{k}": v for k, v in {**logs, **aux}.items()}

    return train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` to `config.total_steps`; returns the final eval metrics."""
    # ---------------------------------------------------------------- set-up
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        metrics.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    mesh = mesh_lib.make_mesh(config.mesh)
    task = tasks.build(config)
    tx, lr_fn = optim.build(config)
    evals = evaluators.build_all(config, task, mesh)
    train_iter = task.train_iterator(jax.process_index(), jax.process_count())
    sample = mesh_lib.global_batch(_peek(train_iter), mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    state, train_iter, start = _initial_state(config, task, tx, mesh, sample, ckpt, train_iter)
    writer = metrics.MetricWriter(workdir, active=is_main, resume_step=start)
    if start and is_main:
        print(f"Resuming from the checkpoint of step {start} in {workdir}/checkpoints.")
    total = config.total_steps

    train_step = jax.jit(
        make_train_step(task, tx, lr_fn, jax.random.fold_in(jax.random.key(config.seed), 1), total),
        donate_argnums=0,
        out_shardings=(jax.tree.map(lambda x: x.sharding, state), mesh_lib.replicated(mesh)),
    )

    # ---------------------------------------------------------------- loop
    preemption = _Preemption()
    window, last_eval, t0 = [], {}, time.perf_counter()
    bar = tqdm.tqdm(total=total, initial=start, desc="train", disable=not is_main, mininterval=2)
    step = start
    try:
        while step < total:
            batch = mesh_lib.global_batch(next(train_iter), mesh)
            state, step_metrics = train_step(state, batch)
            step += 1
            window.append(step_metrics)
            bar.update(1)
            if step % config.log_every == 0 or step == total:
                logs = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *window))
                if not all(map(jnp.isfinite, logs.values())):
                    raise FloatingPointError(
                        f"Non-finite training metrics at step {step}: {logs}. The last good "
                        "checkpoint is kept; lower config.lr or set config.grad_clip_norm."
                    )
                dt = time.perf_counter() - t0
                logs["train/steps_per_sec"] = len(window) / dt
                logs["train/examples_per_sec"] = len(window) * config.batch_size / dt
                writer.write(step, logs)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
                window, t0 = [], time.perf_counter()
            if step % config.eval_every == 0 or step == total:
                variables = {"params": state.params, **state.model_state}
                last_eval = evaluators.run_all(evals, variables)
                writer.write(step, last_eval)
                bar.write(
                    f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items())
                )
            every = config.checkpoint_every
            if (every and step % every == 0) or step == total or preemption.requested:
                ckpt.save(step, state, train_iter)
            if preemption.requested:
                bar.write(f"SIGTERM: saved step {step}; rerun the same command to resume.")
                break
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
        preemption.restore()

    # ---------------------------------------------------------------- summary
    if is_main and step == total:
        metrics.write_json(os.path.join(workdir, "summary.json"), {"step": step, **last_eval})
        plots.write_all(workdir, metrics.read(workdir), evals)
    return last_eval


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs every evaluator on the latest checkpoint in `workdir` and writes `summary.json`."""
    mesh = mesh_lib.make_mesh(config.mesh)
    task = tasks.build(config)
    tx, _ = optim.build(config)
    evals = evaluators.build_all(config, task, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False)
    if ckpt.latest_step() is None:
        raise UserError(f"No checkpoint in {workdir}/checkpoints; train there first.")
    train_iter = task.train_iterator(jax.process_index(), jax.process_count())
    sample = mesh_lib.global_batch(_peek(train_iter), mesh)
    state, _, step = _initial_state(config, task, tx, mesh, sample, ckpt, None)
    ckpt.close()
    results = evaluators.run_all(evals, {"params": state.params, **state.model_state})
    if jax.process_index() == 0:
        metrics.write_json(os.path.join(workdir, "summary.json"), {"step": step, **results})
        plots.write_all(workdir, metrics.read(workdir), evals)
    return results
