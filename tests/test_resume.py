"""Faults: SIGKILL then resume is bit-exact, incomplete checkpoints are skipped (never lost),
restore onto another mesh, and a diverging run stops at the step that diverged."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import xla_flags

from xmodal_jax import tasks
from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.train import checkpoint, optim, trainer
from xmodal_jax.train import step as step_lib

pytestmark = pytest.mark.mesh  # needs the 8 devices of XMODAL_TEST_DEVICES=8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 10  # the kill comes after the checkpoint of step N; both runs end at 2N
# The digits source-only recipe, tracking the best target accuracy; on 8 devices with FSDP
# over 2 of them, so the checkpoint holds sharded arrays.
CONFIG = f"""
from experiments.digits.digits_common import base_config


def get_config(devices="1"):
    c = base_config("direction=m2u")
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = {2 * N}, 5, {N}, {N}
    c.evals = {{"target": {{**c.evals.target, "split": "test[:256]"}}}}
    c.best_metric = "eval/target/accuracy"
    c.mesh = {{"data": 1}} if devices == "1" else {{"data": 4, "fsdp": 2, "model": 1}}
    c.fsdp_min_size = 1024
    return c
"""


def _cmd(workdir, devices):
    config = os.path.join(os.path.dirname(workdir), f"config{devices}.py")
    with open(config, "w") as f:
        f.write(CONFIG)
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(devices),
        # the three runs compile the same programs: compile once
        "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(workdir), f"jax_cache{devices}"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    cmd = [
        sys.executable,
        "-m",
        "xmodal_jax.main",
        "train",
        "--config",
        f"{config}:{devices}",
        "--workdir",
        workdir,
    ]
    return cmd, env


def _start(workdir, devices):
    cmd, env = _cmd(workdir, devices)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _kill_after_n(procs):
    """SIGKILLs each of `{workdir: process}` once its checkpoint N is committed and a step
    after N is logged (watching all of them at once: they run side by side)."""
    waiting, deadline = dict(procs), time.time() + 300
    while waiting and time.time() < deadline:
        for workdir, proc in list(waiting.items()):
            committed = os.path.isdir(os.path.join(workdir, "checkpoints", str(N)))
            if proc.poll() is not None or (
                committed and any(r["step"] > N for r in _rows(workdir))
            ):
                proc.send_signal(signal.SIGKILL)
                del waiting[workdir]
        time.sleep(0.01)
    for workdir, proc in procs.items():
        proc.kill()  # (no-op unless the deadline passed)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
        # killed in the middle: checkpoint N committed, the final one and the summary not written
        assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(N)]
        assert not os.path.exists(os.path.join(workdir, "summary.json"))


def _rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def _deterministic(rows, after):
    return [
        {k: v for k, v in r.items() if k not in trainer.WALL_CLOCK_KEYS}
        for r in rows
        if r["step"] > after
    ]


def _params(workdir, step):
    state = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
    }


def _tear(workdir, step, torn_step):
    """Fabricates what a kill while saving can leave: a copy of checkpoint `step` as
    `torn_step` with its array data cut short, and an uncommitted Orbax temporary directory."""
    ckpts = os.path.join(workdir, "checkpoints")
    torn = os.path.join(ckpts, str(torn_step))
    shutil.copytree(os.path.join(ckpts, str(step)), torn)
    for root, _, files in os.walk(os.path.join(torn, "state")):
        for name in files:
            if os.path.basename(root) == "d":
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
    shutil.copytree(torn, os.path.join(ckpts, f"{torn_step + 2}.orbax-checkpoint-tmp-1234"))


def test_sigkill_then_resume_is_bit_exact(tmp_path, tfds_dir):
    """On one device and on a mesh of 8 (the two topologies run side by side)."""
    topologies = (1, 8)
    straight = {d: str(tmp_path / f"straight{d}") for d in topologies}
    killed = {d: str(tmp_path / f"killed{d}") for d in topologies}
    for proc in [_start(straight[d], d) for d in topologies]:
        _finish(proc)
    _kill_after_n({killed[d]: _start(killed[d], d) for d in topologies})
    _tear(killed[8], N, N + 3)  # and a later checkpoint torn by the kill, on the mesh of 8
    resumed = {d: _start(killed[d], d) for d in topologies}
    resumed = {d: _finish(proc) for d, proc in resumed.items()}

    for d in topologies:
        assert f"Resuming from the checkpoint of step {N}" in resumed[d]
        a, b = _params(straight[d], 2 * N), _params(killed[d], 2 * N)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), (d, k)
        rows = _rows(straight[d])
        assert [r["step"] for r in _deterministic(rows, N)] == [15, 20, 20]  # logs, final eval
        assert all(r["train/flops_per_sec"] > 0 for r in rows if "train/loss" in r)
        assert _deterministic(_rows(killed[d]), 0) == _deterministic(rows, 0)
        # best checkpoint: the step with the highest target accuracy (the first on ties)
        evals = [
            (r["eval/target/accuracy"], -r["step"]) for r in rows if "eval/target/accuracy" in r
        ]
        for wd in (straight[d], killed[d]):
            assert os.listdir(os.path.join(wd, "best")) == [str(-max(evals)[1])]
    # the torn checkpoints were skipped with a warning and set aside; none was lost
    assert resumed[8].count("WARNING: skipping checkpoint") == 2
    aside = sorted(os.listdir(os.path.join(killed[8], "checkpoints_incomplete")))
    logs = [n for n in aside if n.endswith(".log")]  # the details of the unreadable one
    assert [n.split("-")[0] for n in aside if n not in logs] == [f"{N + 3}", f"{N + 5}.orbax"]
    assert [n.split("-")[0] for n in logs] == [f"{N + 3}"]
    assert sorted(os.listdir(os.path.join(killed[8], "checkpoints"))) == [str(N), str(2 * N)]


# ------------------------------------------------------------------ in-process


def _lenet_config(mesh):
    c = ml_collections.ConfigDict()
    c.seed, c.total_steps, c.batch_size, c.lr = 0, 10, 16, 0.1
    c.optimizer = {"name": "sgd", "momentum": 0.9}
    c.model = {"name": "lenet", "num_classes": 10, "bottleneck": 32, "dropout": 0.0}
    c.data, c.mesh, c.fsdp_min_size = {"name": "unused"}, mesh, 256
    return c


def _state_on(mesh_shape):
    config = _lenet_config(mesh_shape)
    mesh = mesh_lib.make_mesh(mesh_shape)
    task, (tx, _) = tasks.build(config), optim.build(config)
    rng = np.random.default_rng(0)
    batch = mesh_lib.global_batch(
        {"image": rng.random((16, 28, 28, 1), np.float32), "label": np.zeros(16, np.int32)}, mesh
    )
    init_fn, abstract = step_lib.init_state(config, task, tx, mesh, batch)
    return init_fn, abstract, batch


def test_restore_onto_another_mesh_and_skip_incomplete(tmp_path, capsys):
    init8, _, batch8 = _state_on({"data": 8, "fsdp": 1, "model": 1})
    saved = init8(batch8)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, saved.replace(step=jnp.int32(step)))
    ckpt.close()
    _tear(str(tmp_path), 2, 3)

    _, abstract, _ = _state_on({"data": 2, "fsdp": 4, "model": 1})
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    state, _, step = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 2 and int(state.step) == 2
    out = capsys.readouterr().out
    assert "skipping checkpoint 3 " in out and "skipping checkpoint 5.orbax-checkpoint-tmp" in out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # restored onto the new mesh: large leaves split over fsdp
    fc = state.params["fc"]["kernel"]
    assert "fsdp" in fc.sharding.spec and fc.addressable_shards[0].data.shape[0] * 4 == 800

    # a checkpoint of another model is not 'incomplete': one clear error, nothing moved
    other = _lenet_config({"data": 8})
    other.model.bottleneck = 64
    task, (tx, _) = tasks.build(other), optim.build(other)
    mesh = mesh_lib.make_mesh({"data": 8})
    _, abstract64 = step_lib.init_state(other, task, tx, mesh, batch8)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    with pytest.raises(
        UserError,
        match=r"step 2 .* does not fit .*bottleneck\.kernel: "
        r"checkpoint \(500, 32\) float32, now \(500, 64\)",
    ):
        ckpt.restore_latest(abstract64)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_non_finite_metrics_name_the_first_bad_step():
    history = step_lib.StepHistory()
    for step in range(1, 6):
        loss = np.inf if step == 4 else float(step)
        history.add(step, {"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(1)})
    with pytest.raises(FloatingPointError, match=r"at step 4: \{'train/loss': inf\}.*step 3"):
        history.fetch(last_good=3)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir):
    from xmodal_jax import config as config_lib

    config = config_lib.load(os.path.join(ROOT, "experiments/digits/source_only.py"))
    config.lr, config.total_steps, config.log_every = 1e4, 30, 1
    config.eval_every, config.checkpoint_every = 1000, 1
    config.optimizer = {"name": "sgd"}
    config.evals = {}
    with pytest.raises(FloatingPointError, match=r"(at|after) step \d+") as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    bad = int(re.search(r"(?:at|after) step (\d+)", str(info.value)).group(1))
    kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert kept and max(kept) < bad
    assert all(np.isfinite(v) for r in _rows(str(tmp_path)) for v in r.values())
    last = ocp.StandardCheckpointer().restore(
        str(tmp_path / "checkpoints" / str(max(kept)) / "state")
    )
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(last["params"]))
    # What ran it is recorded (a diverged run is a result), but no summary: it did not finish.
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["config_hash"] and prov["versions"]["jax"]
    assert not (tmp_path / "summary.json").exists()
