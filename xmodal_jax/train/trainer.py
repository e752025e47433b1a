"""The trainer: one jitted step over a device mesh, Orbax checkpoints, evaluators, logs.

`train_and_evaluate(config, workdir)` resumes from the latest complete checkpoint in `workdir`
if there is one. What is trained (model, input, loss) comes from the task
(`xmodal_jax.train.tasks`); how each parameter is optimised from `xmodal_jax.transfer.rules`;
where each array lives from `xmodal_jax.parallel.sharding`.

Resuming is bit-exact on the same topology: the state holds the step and the base key of the
step randomness, the data iterator's position is saved beside it, and every logged value after
the checkpoint is recomputed identically (except the wall-clock rates). A checkpoint resumes on
any number of processes; the global batches are the same, so the losses agree to float
rounding.

The workdir may be local or remote (`gs://...`): it is only reached through `etils.epath`
(here and in `metrics`, `plots`, `checkpoint`) and Orbax.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from xmodal_jax import provenance
from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.parallel import sharding
from xmodal_jax.train import checkpoint, evaluators, metrics, optim, plots, tasks
from xmodal_jax.transfer import rules

WALL_CLOCK_KEYS = ("train/steps_per_sec", "train/examples_per_sec", "train/flops_per_sec")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # non-trained collections, e.g. batch_stats
    opt_state: Any
    rng: jax.Array  # key data of the base key; step s uses fold_in(key, s)


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


def _check_batch(config, mesh) -> int:
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
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    step = make_train_step(task, tx, lr_fn, config.total_steps, _check_batch(config, mesh))
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )
    return jitted.lower(abstract, sample_batch).compile()


def _flops(compiled) -> float | None:
    """FLOPs of one step summed over devices, from XLA's cost analysis (None if unknown)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = (cost or {}).get("flops")
    return float(flops) * jax.device_count() if flops and flops > 0 else None


def _any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process: every process must stop (and save) together."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class _Metrics:
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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> dict[str, float]:
    """Trains `config` in `workdir` (local or remote) to `config.total_steps`; returns the final
    eval metrics."""
    # ---------------------------------------------------------------- set-up
    workdir = metrics.workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        metrics.write_json(workdir / "config.json", config.to_dict())
    mesh = mesh_lib.make_mesh(config.mesh)
    _check_batch(config, mesh)
    task = tasks.build(config)
    tx, lr_fn = optim.build(config)
    evals = evaluators.build_all(config, task, mesh)
    train_iter = task.train_iterator(jax.process_index(), jax.process_count())
    sample = mesh_lib.global_batch(_peek(train_iter), mesh)
    init_fn, abstract = init_state(config, task, tx, mesh, sample)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(abstract, train_iter)
    if restored is None:
        state, start = init_fn(sample), 0
    else:
        state, train_iter, start = restored
        if is_main:
            print(f"Resuming from the checkpoint of step {start} in {workdir}/checkpoints.")
    best = None
    if config.get("best_metric"):
        evaluator = config.best_metric.split("/")[1] if config.best_metric.count("/") >= 2 else ""
        if not config.best_metric.startswith("eval/") or evaluator not in evals:
            raise UserError(
                f"config.best_metric={config.best_metric!r} is not an evaluation metric; use "
                f"'eval/<evaluator>/<metric>' with an evaluator of {sorted(evals)}."
            )
        best = checkpoint.BestCheckpointer(
            workdir, config.best_metric, config.get("best_mode", "max")
        )
    writer = metrics.MetricWriter(workdir, active=is_main, resume_step=start)
    total = config.total_steps

    train_step = compile_train_step(config, task, tx, lr_fn, abstract, mesh, sample)
    flops = _flops(train_step)
    if is_main:
        trained, count = rules.trainable_count(rules.from_config(config)[0], abstract.params)
        print(f"Training {trained:,} of {count:,} parameters on mesh {dict(mesh.shape)}.")

    # ---------------------------------------------------------------- loop
    preemption = _Preemption()
    history, last_eval, last_saved = _Metrics(), {}, (start or None)
    timed, t0 = 0, time.perf_counter()
    bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step", disable=not is_main)
    step = start
    try:
        while step < total:
            batch = mesh_lib.global_batch(next(train_iter), mesh)
            state, step_metrics = train_step(state, batch)
            step, timed = step + 1, timed + 1
            history.add(step, step_metrics)
            bar.update(1)
            if step % config.log_every == 0 or step == total:
                history.fetch(last_saved)
                logs, dt = history.mean(), time.perf_counter() - t0
                logs["train/steps_per_sec"] = timed / dt
                logs["train/examples_per_sec"] = timed * config.batch_size / dt
                if flops:
                    logs["train/flops_per_sec"] = timed * flops / dt
                writer.write(step, logs)
                ex_s = logs["train/examples_per_sec"]
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", ex_s=f"{ex_s:.0f}")
                timed, t0 = 0, time.perf_counter()
            if due := evaluators.due(config, step):
                history.fetch(last_saved)
                variables = {"params": state.params, **state.model_state}
                results = evaluators.run_all({n: evals[n] for n in due}, variables)
                last_eval.update(results)
                writer.write(step, results)
                shown = {k: v for k, v in results.items() if "class_accuracy/" not in k}
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
                if best is not None and best.update(step, results, state):
                    bar.write(f"step {step}: new best {best.metric}, saved in {workdir}/best")
                timed, t0 = 0, time.perf_counter()
            every, stop = config.checkpoint_every, _any_process(preemption.requested)
            if (every and step % every == 0) or step == total or stop:
                history.fetch(last_saved)
                if not _all_finite(state.params):
                    raise FloatingPointError(
                        f"Parameters are not finite after step {step}; not saved. The last "
                        f"good checkpoint (step {last_saved}) is kept. Lower config.lr."
                    )
                ckpt.save(step, state, train_iter)
                last_saved, timed, t0 = step, 0, time.perf_counter()
            if stop:
                bar.write(f"SIGTERM: saved step {step}; rerun the same command to resume.")
                break
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        if best is not None:
            best.close()
        writer.close()
        preemption.restore()

    # ---------------------------------------------------------------- summary
    if step == total and not last_eval:  # resumed at the end already: evaluate for the summary
        last_eval = evaluators.run_all(evals, {"params": state.params, **state.model_state})
    if is_main and step == total:
        metrics.write_json(workdir / "provenance.json", provenance.describe(config.to_dict()))
        metrics.write_json(workdir / "summary.json", {"step": step, **last_eval})
        plots.write_all(workdir, metrics.read(workdir), evals)
    return last_eval


def evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, float]:
    """Runs every evaluator on the latest checkpoint in `workdir` and writes `summary.json`."""
    workdir = metrics.workdir_path(workdir)
    mesh = mesh_lib.make_mesh(config.mesh)
    task = tasks.build(config)
    tx, _ = optim.build(config)
    evals = evaluators.build_all(config, task, mesh)
    train_iter = task.train_iterator(jax.process_index(), jax.process_count())
    sample = mesh_lib.global_batch(_peek(train_iter), mesh)
    _, abstract = init_state(config, task, tx, mesh, sample)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False)
    restored = ckpt.restore_latest(abstract)
    ckpt.close()
    if restored is None:
        raise UserError(f"No checkpoint in {workdir}/checkpoints; train there first.")
    state, _, step = restored
    results = evaluators.run_all(evals, {"params": state.params, **state.model_state})
    if jax.process_index() == 0:
        metrics.write_json(workdir / "provenance.json", provenance.describe(config.to_dict()))
        metrics.write_json(workdir / "summary.json", {"step": step, **results})
        plots.write_all(workdir, metrics.read(workdir), evals)
    return results
