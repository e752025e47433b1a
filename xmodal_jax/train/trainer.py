"""The training loop: the jitted step of `step` over a device mesh, checkpoints, evaluators, logs.

`train_and_evaluate(config, workdir)` resumes from the latest complete checkpoint in `workdir`
if there is one. What is trained (model, input, loss) comes from the task (`xmodal_jax.tasks`);
how each parameter is optimised from `transfer.rules`; where each array lives from `sharding`.

Resuming is bit-exact on the same topology: the state holds the step and the base key of the
step randomness, the data iterator's position is saved beside it, and every logged value after
the checkpoint is recomputed identically (except the wall-clock rates). A checkpoint resumes on
any number of processes; the global batches are the same, so the losses agree to float
rounding.

The workdir may be local or remote (`gs://...`): it is only reached through `etils.epath`
(here and in `metrics`, `plots`, `checkpoint`) and Orbax.

Faults: everything a user can get wrong (config values, the workdir, the data directory) is
checked before the workdir is written and before anything compiles. One command at a time holds
the workdir (`workdir_lock`). SIGTERM or a first Ctrl-C makes the loop save after its current
step and raise `Preempted` (exit code 75: not finished, rerun to resume); a second Ctrl-C kills
the process at once. `config.json` is written once the run has restored its checkpoint or
started from step 0; a resumed run whose config differs keeps the earlier one as
`config.<step>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from xmodal_jax import config as config_lib
from xmodal_jax import evaluators, provenance, tasks, timing
from xmodal_jax.errors import EXIT_PREEMPTED, Preempted, UserError
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.train import best as best_lib
from xmodal_jax.train import checkpoint, metrics, optim, plots, workdir_lock
from xmodal_jax.train import step as step_lib
from xmodal_jax.transfer import rules

WALL_CLOCK_KEYS = ("train/steps_per_sec", "train/examples_per_sec", "train/flops_per_sec")


class _Preemption:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks after each step
    (save, then stop with `Preempted`). After the first Ctrl-C, SIGINT has its default action
    again: a second one kills the process at once, saving nothing more."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None  # the name of the first signal
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        del frame
        self.requested = self.requested or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # os.write, not print: the handler may interrupt a print to the same stream
            os.write(
                2,
                b"\nCtrl-C: saving after this step, then stopping (exit code "
                + str(EXIT_PREEMPTED).encode()
                + b"); press Ctrl-C again to abort at once without saving.\n",
            )

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _peek(iterator):
    """The next batch, leaving the iterator where it was."""
    state = iterator.get_state()
    batch = next(iterator)
    iterator.set_state(state)
    return batch


def _any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process: every process must stop (and save) together."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def _on_main(fn: Callable[[], None]) -> None:
    """Runs `fn` on process 0 only (the workdir's checks and lock); when it raises a
    UserError, every process raises one, so none is left waiting for the others."""
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except UserError as e:
            error = e
    if _any_process(error is not None):
        raise error or UserError("process 0 stopped before training; its message says why.")


def _check_best_metric(config) -> None:
    metric = config.get("best_metric")
    if not metric:
        return
    evaluator = metric.split("/")[1] if metric.count("/") >= 2 else ""
    if not metric.startswith("eval/") or evaluator not in config.evals:
        raise UserError(
            f"config.best_metric={metric!r} is not an evaluation metric; use "
            f"'eval/<evaluator>/<metric>' with an evaluator of {sorted(config.evals)}."
        )


def _record_config(workdir: epath.Path, config: ml_collections.ConfigDict, step: int) -> None:
    """Writes `config.json`; an earlier one that differs is kept as `config.<step>.json`
    (`step`: where this config takes over), so the workdir says what made each checkpoint."""
    path, new = workdir / "config.json", json.loads(json.dumps(config.to_dict()))
    if path.exists():
        text = path.read_text()
        try:
            same = json.loads(text) == new
        except json.JSONDecodeError:
            same = False
        if not same:
            keep, n = workdir / f"config.{step}.json", 1
            while keep.exists():
                keep, n = workdir / f"config.{step}.{n}.json", n + 1
            metrics.write_text(keep, text)
            print(f"The config differs from the workdir's; the earlier one is kept as {keep}.")
    metrics.write_json(path, new)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> dict[str, float]:
    """Trains `config` in `workdir` (local or remote) to `config.total_steps`; returns the final
    eval metrics. Raises `Preempted` when stopped early by a signal (after saving)."""
    # ---------------------------------------------------------------- checks (cheap)
    workdir = metrics.workdir_path(workdir)
    config_lib.check_values(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    step_lib.check_batch(config, mesh)
    _check_best_metric(config)
    lock = workdir_lock.WorkdirLock(workdir, "xmodal train")
    _on_main(lambda: metrics.check_train_workdir(workdir))
    _on_main(lock.check_free)
    preemption = _Preemption()
    timing.reset()
    try:
        with timing.phase("set-up"):
            setup = _build(config, mesh)  # data preparation errors stop the run here
        _on_main(lock.acquire)  # from here on the workdir is ours
        try:
            return _train(config, workdir, setup, lock, preemption)
        finally:
            lock.release()
    finally:
        preemption.restore()


@dataclasses.dataclass
class _Setup:
    """What a run builds before it touches its workdir: model, optimiser, input, evaluators and
    the state's shapes."""

    mesh: Any
    task: Any
    tx: optax.GradientTransformation
    lr_fn: Any
    evals: dict[str, Any]
    train_iter: Any
    sample: Any  # the first global batch (shapes for compiling)
    init_fn: Any
    abstract: Any  # the state's shapes and shardings: the restore target
    provenance: dict  # the code and stack that run, described before anything else happens


def _build(config: ml_collections.ConfigDict, mesh) -> _Setup:
    prov = provenance.describe(config.to_dict())  # the checkout may change while the run goes
    task = tasks.build(config, mesh)
    tx, lr_fn = optim.build(config)
    evals = evaluators.build_all(config, task.predict_fns(), mesh)
    train_iter = task.train_iterator(jax.process_index(), jax.process_count())
    sample = mesh_lib.global_batch(_peek(train_iter), mesh)
    init_fn, abstract = step_lib.init_state(config, task, tx, mesh, sample)
    return _Setup(mesh, task, tx, lr_fn, evals, train_iter, sample, init_fn, abstract, prov)


def _train(config, workdir, setup: _Setup, lock, preemption: _Preemption) -> dict[str, float]:
    """Restores or initialises the state, trains to `total_steps`, writes the summary."""
    mesh, evals, train_iter, abstract = setup.mesh, setup.evals, setup.train_iter, setup.abstract
    is_main = jax.process_index() == 0
    total = config.total_steps
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        restored = ckpt.restore_latest(abstract, train_iter)
        if restored is None:
            state, start, pending = setup.init_fn(setup.sample), 0, []
        else:
            state, train_iter, start = restored
            pending = ckpt.pending_metrics(start)
    except BaseException:
        ckpt.close()
        raise
    if start > total:
        ckpt.close()
        raise UserError(
            f"The checkpoint of step {start} in {workdir}/checkpoints is past "
            f"config.total_steps={total}; raise --config.total_steps to continue it, or use a "
            "new --workdir."
        )
    if is_main:
        _record_config(workdir, config, start)
        if start:
            print(f"Resuming from the checkpoint of step {start} in {workdir}/checkpoints.")
    best = None
    if config.get("best_metric"):
        best = best_lib.BestCheckpointer(
            workdir, config.best_metric, config.get("best_mode", "max")
        )
    writer = metrics.MetricWriter(workdir, active=is_main, resume_step=start)

    # ---------------------------------------------------------------- compile
    with timing.phase("compile"):
        train_step = step_lib.compile_train_step(
            config, setup.task, setup.tx, setup.lr_fn, abstract, mesh, setup.sample
        )
    flops = step_lib.flops(train_step)
    if is_main:
        trained, count = rules.trainable_count(rules.from_config(config)[0], abstract.params)
        print(f"Training {trained:,} of {count:,} parameters on mesh {dict(mesh.shape)}.")

    # ---------------------------------------------------------------- loop
    history, last_eval, last_saved = step_lib.StepHistory(), {}, (start or None)
    history.fetched = pending  # the steps since the last log line, saved with the checkpoint
    timed, t0 = 0, time.perf_counter()
    bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step", disable=not is_main)
    step = start
    stop = _any_process(preemption.requested is not None)  # a signal during the set-up
    try:
        with timing.phase("training"):
            while step < total and not stop:
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
                    with timing.phase("evaluation"):
                        results = evaluators.run_all({n: evals[n] for n in due}, variables)
                    last_eval.update(results)
                    writer.write(step, results)
                    bar.write(f"step {step}: " + " | ".join(evaluators.headline(results)))
                    if best is not None and best.update(step, results, state):
                        bar.write(f"step {step}: new best {best.metric}, saved in {workdir}/best")
                    timed, t0 = 0, time.perf_counter()
                every, stop = (
                    config.checkpoint_every,
                    _any_process(preemption.requested is not None),
                )
                if (every and step % every == 0) or step == total or stop:
                    history.fetch(last_saved)
                    if not _all_finite(state.params):
                        raise FloatingPointError(
                            f"Parameters are not finite after step {step}; not saved. The last "
                            f"good checkpoint (step {last_saved}) is kept. Lower config.lr."
                        )
                    _on_main(lock.check)
                    with timing.phase("checkpoints"):
                        ckpt.save(step, state, train_iter, pending=history.fetched)
                    last_saved, timed, t0 = step, 0, time.perf_counter()
    except FloatingPointError:  # a diverged run is a result too: say what ran it
        if is_main:
            metrics.write_json(workdir / "provenance.json", setup.provenance)
        raise
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        if best is not None:
            best.close()
        writer.close()
    if step < total:
        if jax.process_count() > 1:  # no process exits (a launcher may then kill the others)
            multihost_utils.sync_global_devices("xmodal_preempted")  # before all have saved
        what = f"saved the checkpoint of step {step}" if step > start else "nothing new to save"
        raise Preempted(
            f"stopped by {preemption.requested} at step {step} of {total} ({what}); not "
            f"finished. Rerun the same command to resume from {workdir}/checkpoints."
        )

    # ---------------------------------------------------------------- summary
    with timing.phase("summary and plots"):
        if not last_eval:  # resumed at the end already: evaluate for the summary
            with timing.phase("evaluation"):
                variables = {"params": state.params, **state.model_state}
                last_eval = evaluators.run_all(evals, variables)
        if is_main:
            lines = evaluators.headline(last_eval, every_metric=True)
            print(f"Final evaluation at step {step}:" + "".join(f"\n  {x}" for x in lines))
            _write_results(workdir, setup.provenance, step, last_eval, evals)
    if is_main:
        metrics.write_json(workdir / "timing.json", timing.totals())
        print(timing.line(timing.totals()))
    return last_eval


def _write_results(workdir, prov: dict, step: int, results: dict[str, float], evals) -> None:
    """`provenance.json`, `summary.json` (`step` and every metric), then the plots."""
    metrics.write_json(workdir / "provenance.json", prov)
    metrics.write_json(workdir / "summary.json", {"step": step, **results})
    print(f"Plotting into {workdir}/plots ...", flush=True)
    plots.write_all(workdir, metrics.read(workdir), evals)


def evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, float]:
    """Runs every evaluator on the latest checkpoint in `workdir` and writes `summary.json`.

    The results are printed before anything is written; a workdir this user cannot write is
    evaluated all the same, and then reported with a UserError (nothing is written there)."""
    workdir = metrics.workdir_path(workdir)
    is_main = jax.process_index() == 0
    _on_main(lambda: metrics.check_eval_workdir(workdir))
    read_only = _any_process(is_main and metrics.workdir_problem(workdir) is not None)
    lock = workdir_lock.WorkdirLock(workdir, "xmodal eval")
    if read_only:  # nothing to lock (nothing is written), but not while a run writes there
        _on_main(lock.check_free)
        if is_main:
            print(f"{workdir} is not writable: evaluating anyway; the results are not saved.")
    else:
        _on_main(lock.acquire)
    try:
        _on_main(lambda: metrics.check_has_checkpoints(workdir))
        setup = _build(config, mesh_lib.make_mesh(config.mesh))
        evals = setup.evals
        ckpt = checkpoint.Checkpointer(
            workdir, keep=config.keep_checkpoints, async_save=False, read_only=read_only
        )
        try:
            restored = ckpt.restore_latest(setup.abstract)
        finally:
            ckpt.close()
        if restored is None:
            raise UserError(f"No checkpoint in {workdir}/checkpoints; train there first.")
        state, _, step = restored
        if is_main:
            print(f"Evaluating the checkpoint of step {step} in {workdir}/checkpoints:", flush=True)
        variables = {"params": state.params, **state.model_state}
        results = evaluators.run_all(evals, variables, progress=is_main)
        if read_only:
            raise UserError(
                f"{workdir} is not writable, so the results above were not saved "
                "(summary.json, plots/); make it writable and rerun to save them."
            )
        if is_main:
            try:
                _write_results(workdir, setup.provenance, step, results, evals)
            except OSError as e:
                raise UserError(
                    f"Could not write the results to {workdir} ({e}); they are printed above."
                ) from None
        return results
    finally:
        lock.release()
