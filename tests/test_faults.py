"""Faults a user meets, each answered by an exit code and one line, never by a lost run.

Runs never corrupt each other (the workdir lock), never look finished when they are not (exit
75 after SIGTERM or Ctrl-C, no `done` marker), restart only when told to (every checkpoint
unreadable), keep what made their checkpoints (`config.json`), and refuse bad input with exit 2
and one line before touching the workdir. Subprocesses only where a real signal or a second
concurrent process matters; everything else runs in this process, on one tiny trained run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stdout

import fake_gcs
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from xmodal_jax import main
from xmodal_jax.errors import EXIT_PREEMPTED, UserError
from xmodal_jax.tables import cli as table_cli
from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import runner
from xmodal_jax.tables import spec as spec_lib
from xmodal_jax.train import trainer, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 240  # two checkpoints (120, 240); a log line every 7 steps, so a stop rarely hits one
CONFIG = f"""
from experiments.digits.digits_common import base_config


def get_config(arg=None):
    c = base_config("direction=m2u")
    c.total_steps, c.batch_size, c.log_every, c.eval_every = {STEPS}, 16, 7, 0
    c.checkpoint_every = {STEPS // 2}
    c.evals = {{"target": {{**c.evals.target, "split": "test[:128]"}}}}
    c.eval_batch_size = 128
    return c
"""


# ------------------------------------------------------------------ helpers


def _xmodal(*args: str) -> tuple[int, str, str]:
    """`xmodal ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    real_err = sys.stderr
    sys.stderr = err
    try:
        with redirect_stdout(out):
            rc = main.main(list(args))
    finally:
        sys.stderr = real_err
    return rc, out.getvalue(), err.getvalue()


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in trainer.WALL_CLOCK_KEYS} for r in rows]


def _params(workdir: str, step: int) -> list[np.ndarray]:
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(path))]


def _same_run(workdir: str, reference: str) -> None:
    """Bit for bit: the final state and every logged value (but the wall-clock rates)."""
    assert _rows(workdir) == _rows(reference)
    for a, b in zip(_params(workdir, STEPS), _params(reference, STEPS), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _digest(path: str) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes (empty when `path` does not exist)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


def _corrupt(workdir: str, step: int) -> None:
    """Cuts the array files of checkpoint `step` short, as a disk or a killed copy can."""
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
        if os.path.basename(root) == "d":
            for name in files:
                os.truncate(os.path.join(root, name), 10)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny_digits.py"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def lone(config, tmp_path_factory, tfds_dir) -> tuple[str, str]:
    """A run of CONFIG alone, uninterrupted, in this process: its workdir and its stdout."""
    workdir = str(tmp_path_factory.mktemp("lone") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XMODAL_DISTRIBUTED", "off")
        rc, out, err = _xmodal("train", "--config", config, "--workdir", workdir)
    assert rc == 0, err[-3000:]
    return workdir, out


@pytest.fixture
def trained(lone, tmp_path) -> str:
    """A copy of the lone run's workdir, to be changed by a test."""
    workdir = str(tmp_path / "run")
    shutil.copytree(lone[0], workdir)
    return workdir


# ------------------------------------------------------------------ 1, 2, 5, 8: two runs, signals


def _lock_pid(workdir: str) -> int | None:
    holder = workdir_lock.holder(workdir)
    return holder.pid if holder else None


def _wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 240
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"no {what} (exit {proc.returncode}): {err[-3000:]}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def stopped(config, lone, tmp_path_factory, tfds_dir) -> dict:
    """Two runs of CONFIG as `xmodal train` subprocesses, side by side, stopped after their first
    log line: one by SIGTERM, one by Ctrl-C (SIGINT). While the first holds its workdir, a
    second `train` there (another lr) and an `eval` are tried, in this process."""
    tmp = tmp_path_factory.mktemp("stopped")
    env = {**os.environ, "XMODAL_DISTRIBUTED": "off", "TFDS_DATA_DIR": tfds_dir}
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        cmd = [sys.executable, "-m", "xmodal_jax.main", "train", "--config", config,
               "--workdir", str(tmp / sig.name)]  # fmt: skip
        procs[sig] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    busy, proc = str(tmp / "SIGTERM"), procs[signal.SIGTERM]
    _wait_for(lambda: _lock_pid(busy) == proc.pid, proc, "lock")
    refused = {
        "train": _xmodal("train", "--config", config, "--workdir", busy, "--config.lr=0.05"),
        "eval": _xmodal("eval", "--config", config, "--workdir", busy),
    }
    sent = {}
    for sig, proc in procs.items():
        metrics = os.path.join(tmp, sig.name, "metrics.jsonl")
        _wait_for(lambda m=metrics: os.path.exists(m) and os.path.getsize(m), proc, "log line")
        proc.send_signal(sig)
        sent[sig] = time.time()
    results = {}
    for sig, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert time.time() - sent[sig] < 60, f"{sig.name}: no prompt stop"
        results[sig] = (str(tmp / sig.name), proc.returncode, out, err)
    return {"refused": refused, "pid": procs[signal.SIGTERM].pid, "runs": results}


def test_a_second_command_on_a_busy_workdir_is_refused(stopped, lone):
    for verb, (rc, _, err) in stopped["refused"].items():
        line = _one_line(err)
        assert rc == 2, (verb, err)
        assert f"in use by xmodal train (pid {stopped['pid']} on " in line and "since" in line
        assert "another --workdir" in line
    # The refused run left no trace: the first run's config and log are its own (and it ends
    # bit-identical to the lone run below).
    workdir = stopped["runs"][signal.SIGTERM][0]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["lr"] == 0.01


@pytest.mark.parametrize(  # SIGINT's rerun in the slow tier: the same resume path
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_stopped_run_exits_75_and_resumes_bit_identical(sig, stopped, config, lone):
    workdir, rc, out, err = stopped["runs"][sig]
    assert rc == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"xmodal: stopped by {sig.name} at step ") and "Rerun" in last
    if sig == signal.SIGINT:
        assert "press Ctrl-C again to abort at once" in err
    (saved,) = (int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert f"at step {saved} of {STEPS}" in last and 7 <= saved < STEPS
    assert not os.path.exists(os.path.join(workdir, "summary.json"))  # not finished
    # The rerun (its predecessor is gone, and so is its lock) resumes from the stop (most
    # often between two log steps) and ends as the uninterrupted run did, to the bit.
    rc, out, err = _xmodal("train", "--config", config, "--workdir", workdir)
    assert rc == 0, err[-3000:]
    assert f"Resuming from the checkpoint of step {saved}" in out
    _same_run(workdir, lone[0])


def test_a_second_ctrl_c_aborts_at_once():
    """The first Ctrl-C sets the flag; SIGINT then has its default action (kill), so a second
    one stops the process even inside a long XLA call, where no Python handler runs."""
    previous = signal.getsignal(signal.SIGINT)
    preemption = trainer._Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert preemption.requested == "SIGINT"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)  # a SIGTERM now changes nothing: still saving
        assert preemption.requested == "SIGINT"
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGINT) is previous


# ------------------------------------------------------------------ 1: the lock itself


def test_local_lock_names_its_holder_and_dies_with_it(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    first = workdir_lock.WorkdirLock(workdir, "xmodal train")
    first.acquire()
    with pytest.raises(UserError, match=rf"in use by xmodal train \(pid {os.getpid()} on "):
        workdir_lock.WorkdirLock(workdir, "xmodal eval").acquire()
    first.release()
    assert workdir_lock.holder(workdir) is None

    # A holder killed with SIGKILL cannot clean up; the kernel drops its flock all the same.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, workdir], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert holder.stdout.readline().strip() == "locked"
    assert workdir_lock.holder(workdir).pid == holder.pid
    assert jobs_lib.status(workdir) == "running"
    holder.kill()
    holder.wait()
    assert workdir_lock.holder(workdir) is None
    again = workdir_lock.WorkdirLock(workdir, "xmodal train")
    again.acquire()
    again.release()

    # A table job: the runner locks, the trainer it starts inherits the lock (XMODAL_LOCK_FD).
    fd = workdir_lock.flock(os.path.join(workdir, "lock"), "xmodal table")
    try:
        with pytest.raises(UserError, match="in use by xmodal table"):
            workdir_lock.WorkdirLock(workdir, "xmodal train").check_free()
        monkeypatch.setenv(workdir_lock.FD_ENV, str(os.dup(fd)))  # as a child inherits it
        child = workdir_lock.WorkdirLock(workdir, "xmodal train")
        child.check_free()
        child.acquire()
        child.release()
    finally:
        os.close(fd)


HOLD = textwrap.dedent(
    """
    import sys, time
    from xmodal_jax.train import workdir_lock
    workdir_lock.WorkdirLock(sys.argv[1], "xmodal train").acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_remote_lease_is_refused_renewed_taken_over_when_stale(tmp_path, monkeypatch):
    buckets = tmp_path / "buckets"
    buckets.mkdir()
    fake_gcs.route_gs(monkeypatch, buckets)
    monkeypatch.setattr(workdir_lock, "SETTLE_SECS", 0.0)
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_SECS", 0.05)
    workdir = "gs://bucket/runs/a"
    lease = buckets / "bucket" / "runs" / "a" / "lock"
    try:
        first = workdir_lock.WorkdirLock(workdir, "xmodal train")
        first.acquire()
        with pytest.raises(UserError, match=rf"in use by xmodal train \(pid {os.getpid()} "):
            workdir_lock.WorkdirLock(workdir, "xmodal train").acquire()
        assert jobs_lib.status(workdir) == "running"
        beat = json.loads(lease.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lease.read_text())["heartbeat"] > beat  # renewed while held
        first.release()
        assert not lease.exists()

        # Stale: no heartbeat for LEASE_TIMEOUT_SECS (a host that died), or a dead process
        # of this host. The next command takes the lease over; the old holder, if it comes
        # back, sees it lost the lease and stops before its next save.
        old = workdir_lock.WorkdirLock(workdir, "xmodal train")
        old.acquire()
        fields = json.loads(lease.read_text())
        lease.write_text(json.dumps({**fields, "host": "gone", "heartbeat": time.time() - 3600}))
        assert workdir_lock.holder(workdir) is None
        new = workdir_lock.WorkdirLock(workdir, "xmodal train")
        new.acquire()
        time.sleep(0.3)
        with pytest.raises(UserError, match="was taken over by xmodal train"):
            old.check()
        old.release()
        assert lease.exists()  # not the old holder's to delete
        new.release()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        lease.write_text(json.dumps({**fields, "pid": int(dead), "heartbeat": time.time()}))
        assert workdir_lock.holder(workdir) is None
    finally:
        fake_gcs.clear_caches()


# ------------------------------------------------------------------ 2: tables and launchers

FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys, time
    wd = sys.argv[sys.argv.index("--workdir") + 1]
    os.makedirs(wd, exist_ok=True)
    code = int(os.environ["FAKE_EXIT"])
    print("training", wd)
    while time.process_time() < float(os.environ.get("FAKE_CPU_S", 0)):  # computes, then waits
        pass
    time.sleep(float(os.environ.get("FAKE_SLEEP_S", 0)))
    if code == 0 and not os.environ.get("FAKE_NO_SUMMARY"):
        with open(os.path.join(wd, "summary.json"), "w") as f:
            json.dump({"step": 2, "eval/target/accuracy": 0.5}, f)
    if code == 3:  # as `xmodal train` says it
        print("xmodal: training diverged: Non-finite training metrics at step 7. Stopped; the "
              "last good checkpoint (none) is kept.", file=sys.stderr)
    sys.exit(code)
    """
)


def _table(tmp_path) -> str:
    (tmp_path / "cfg.py").write_text("def get_config(arg=None):\n    raise NotImplementedError\n")
    path = tmp_path / "t.py"
    path.write_text(
        "from xmodal_jax.tables import Column, Row, Table\n"
        f"TABLE = Table(title='T', rows=[Row('r', {str(tmp_path / 'cfg.py')!r})],\n"
        "    columns=[Column('T', 'eval/target/accuracy')], seeds=(0,))\n"
    )
    return str(path)


def test_a_preempted_job_is_not_done(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table, root = _table(tmp_path), str(tmp_path / "root")
    (line,) = table_cli.dry_run_lines(jobs_lib.expand(spec_lib.load(table)[1]), root, "t")
    workdir = shlex.split(line)[shlex.split(line).index("--workdir") + 1]

    # The dry run's line of a job stopped by a signal: exit 75, no `done`; printed again.
    run_line = lambda code: subprocess.run(["bash", "-c", line], env={**os.environ,
                                           "FAKE_EXIT": code})  # fmt: skip
    assert run_line("75").returncode == EXIT_PREEMPTED
    assert jobs_lib.status(workdir) == "unfinished"
    assert table_cli.run([table, "--root", root, "--dry-run"])["to_run"] == 1
    # `--collect-only` lists it as missing (also with a `done` left by an older version's
    # line, which marked a preempted job done: no summary.json, so not done).
    open(os.path.join(workdir, jobs_lib.DONE), "w").close()
    assert jobs_lib.status(workdir) == "unfinished"
    assert main.main(["table", table, "--root", root, "--collect-only"]) == 0
    md = open(os.path.join(root, "t.md")).read()
    assert "| r | missing (0 of 1) |" in md and "r, seed 0: unfinished (" in md
    os.remove(os.path.join(workdir, jobs_lib.DONE))

    # The table runner: a job that exits 75 gets no marker, and the command exits 75.
    monkeypatch.setenv("FAKE_EXIT", "75")
    assert main.main(["table", table, "--root", root]) == EXIT_PREEMPTED
    assert jobs_lib.status(workdir) == "unfinished"
    monkeypatch.setenv("FAKE_EXIT", "0")
    assert main.main(["table", table, "--root", root]) == 0
    assert jobs_lib.status(workdir) == "done"
    assert table_cli.run([table, "--root", root, "--dry-run"])["to_run"] == 0
    assert run_line("0").returncode == 0  # a line of an ended job: not run again
    assert open(os.path.join(workdir, jobs_lib.LOG)).read().count("training") == 3


def test_a_dry_run_line_marks_its_job_as_the_runner_does(tmp_path, monkeypatch):
    """A `--dry-run` line runs the job through `run_job`: `done` with the wall time, `diverged`
    with what the trainer said (then never printed again), `failed` with the exit status."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table, root = _table(tmp_path), str(tmp_path / "root")
    (line,) = table_cli.dry_run_lines(jobs_lib.expand(spec_lib.load(table)[1]), root, "t")
    argv = shlex.split(line)
    assert argv[:3] == [sys.executable, "-m", "xmodal_jax.tables.run_job"] and argv[4] == "--"
    workdir = argv[3]
    run_line = lambda code: subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                                           env={**os.environ, "FAKE_EXIT": code})  # fmt: skip
    marker = lambda name: json.load(open(os.path.join(workdir, name)))

    r = run_line("5")
    assert r.returncode == 5 and f"training {workdir}" in r.stdout and "failed (exit 5)" in r.stderr
    assert jobs_lib.status(workdir) == "failed" and marker(jobs_lib.FAILED)["rc"] == 5
    # Exit 0 without a summary is a failure too, and the line's status says so to its launcher.
    r = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                       env={**os.environ, "FAKE_EXIT": "0", "FAKE_NO_SUMMARY": "1"})  # fmt: skip
    assert r.returncode == 1 and "failed (exit 0, no summary.json)" in r.stderr
    assert jobs_lib.status(workdir) == "failed" and marker(jobs_lib.FAILED)["rc"] == 0
    r = run_line("3")
    assert r.returncode == 3 and jobs_lib.status(workdir) == "diverged"
    said = marker(jobs_lib.DIVERGED)["said"]
    assert said == "Non-finite training metrics at step 7"
    assert not os.path.exists(os.path.join(workdir, jobs_lib.FAILED))
    assert table_cli.run([table, "--root", root, "--dry-run"])["to_run"] == 0
    assert main.main(["table", table, "--root", root, "--collect-only"]) == 0
    assert f"r, seed 0: diverged ({said})" in open(os.path.join(root, "t.md")).read()

    os.remove(os.path.join(workdir, jobs_lib.DIVERGED))  # as the README says, to retry it
    t0 = time.monotonic()
    assert run_line("0").returncode == 0 and jobs_lib.status(workdir) == "done"
    done = marker(jobs_lib.DONE)
    assert done["rc"] == 0 and 0 <= done["wall_s"] <= time.monotonic() - t0  # a fast fake run
    log = open(os.path.join(workdir, jobs_lib.LOG)).read()
    assert log.count(f"training {workdir}") == 4 and log.count("\n$ ") == 4
    assert "training diverged: Non-finite" in log  # stderr too
    assert table_cli.run([table, "--root", root, "--dry-run"])["to_run"] == 0


def test_a_jobs_marker_records_its_cpu_time_beside_its_wall_time(tmp_path, monkeypatch):
    """`done` keeps the run's CPU time (`cpu_s`), which a run that waits (stopped, sleeping, or
    sharing its cores) does not inflate as it does the wall time: through the runner and
    through a dry run's line (`run_job`)."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    for k, v in {"FAKE_EXIT": "0", "FAKE_CPU_S": "0.3", "FAKE_SLEEP_S": "1"}.items():
        monkeypatch.setenv(k, v)
    table, root = _table(tmp_path), str(tmp_path / "root")
    (line,) = table_cli.dry_run_lines(jobs_lib.expand(spec_lib.load(table)[1]), root, "t")
    workdir = shlex.split(line)[3]
    for how in ("runner", "dry run line"):
        if how == "runner":
            assert main.main(["table", table, "--root", root]) == 0
        else:
            os.remove(os.path.join(workdir, jobs_lib.DONE))
            assert subprocess.run(["bash", "-c", line], capture_output=True).returncode == 0
        done = json.load(open(os.path.join(workdir, jobs_lib.DONE)))
        assert 0.3 <= done["cpu_s"] <= done["wall_s"] - 0.8, (how, done)


def _fake_commands(tmp_path, **scripts: str) -> dict[str, str]:
    """Executables named after the keys (shell bodies) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_launchers_requeue_or_rerun_a_preempted_run(tmp_path):
    calls = tmp_path / "calls"
    # SLURM: a run that exits 75 is requeued, and the script says so.
    env = _fake_commands(tmp_path, srun="exit 75", scontrol=f'echo "$*" >> {calls}')
    env.update(SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=ROOT, XMODAL_PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--config", "c.py",
                        "--workdir", "/w"], env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == EXIT_PREEMPTED and "requeueing job 42" in r.stderr
    assert calls.read_text().split() == ["requeue", "42"]

    # Local processes: one exiting 75 does not get the other killed mid-save.
    t0 = time.time()
    r = subprocess.run(
        [os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "1", "--", "sh", "-c",
         '[ "$XMODAL_PROCESS_ID" = 0 ] || sleep 1; exit 75'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == EXIT_PREEMPTED and "stopping the others" not in r.stderr
    assert time.time() - t0 >= 1

    # TPU pod: with --restarts, a preempted train step runs again (and resumes).
    gcloud = (
        f'echo "$*" >> {calls}.tpu; case "$*" in *"describe"*) echo READY ;; '
        f'*"xmodal train"*) [ -e {calls}.again ] && exit 0; touch {calls}.again; exit 75 ;; '
        "esac; exit 0"
    )
    env = {**_fake_commands(tmp_path / "tpu", gcloud=gcloud), "TMPDIR": str(tmp_path)}
    args = [os.path.join(ROOT, "launch", "tpu_pod.sh"), "--name", "x", "--zone", "z",
            "--accelerator-type", "v4-8", "--workdir", "gs://b/x", "--restarts", "1", "--",
            "--config", "c.py"]  # fmt: skip
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "restart 1 of 1" in r.stderr
    trains = [c for c in (tmp_path / "calls.tpu").read_text().splitlines() if "xmodal train" in c]
    assert len(trains) == 2


ARRAY = os.path.join(ROOT, "launch", "slurm_array.sbatch")


def test_slurm_arrays_run_a_tables_dry_run_lines_and_requeue_a_preempted_one(tmp_path, monkeypatch):
    """`--dry-run` lines as two SLURM arrays: the jobs that read other runs (`needs`) in the
    second; every task runs its line, a preempted one requeues itself, and the table collects."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    (tmp_path / "cfg.py").write_text("def get_config(arg=None):\n    raise NotImplementedError\n")
    table = tmp_path / "t.py"
    table.write_text(
        "from xmodal_jax.tables import Column, Row, Table\n"
        f"CFG = {str(tmp_path / 'cfg.py')!r}\n"
        "TABLE = Table(title='T', rows=[Row('src', CFG), Row('shot', CFG, 'm=shot', "
        "needs={'source': 'src'})], columns=[Column('T', 'eval/target/accuracy')], "
        "seeds=(0, 1))\n"
    )
    root = str(tmp_path / "root")
    jobs = tmp_path / "jobs.txt"
    with redirect_stdout(io.StringIO()) as out:
        table_cli.run([str(table), "--root", root, "--dry-run"])
    jobs.write_text(out.getvalue())
    lines = out.getvalue().splitlines()
    assert [line.startswith("#") for line in lines] == [False, False, True, False, False]

    calls = tmp_path / "calls"
    env = _fake_commands(tmp_path, scontrol=f'echo "$*" >> {calls}')
    env.update(SLURM_SUBMIT_DIR=str(tmp_path), FAKE_EXIT="0")
    array = lambda *args, **e: subprocess.run(["bash", ARRAY, *args], env={**env, **e},
                                              capture_output=True, text=True)  # fmt: skip
    submit = array("jobs.txt").stdout.splitlines()
    assert submit[1] == f"first=$(sbatch --parsable --array=1-2 {ARRAY} jobs.txt 1)"
    assert submit[2] == f"sbatch --dependency=afterok:$first --array=1-2 {ARRAY} jobs.txt 2"

    task = dict(SLURM_JOB_ID="43", SLURM_ARRAY_JOB_ID="42")
    r = array("jobs.txt", "1", SLURM_ARRAY_TASK_ID="2", FAKE_EXIT="75", **task)
    assert r.returncode == EXIT_PREEMPTED and "requeueing array task 42_2" in r.stderr
    assert calls.read_text().split() == ["requeue", "42_2"]
    assert table_cli.run([str(table), "--root", root, "--dry-run"])["to_run"] == 4
    for part, i in (("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")):
        r = array("jobs.txt", part, SLURM_ARRAY_TASK_ID=i, **task)
        assert r.returncode == 0, r.stderr
        assert f"(part {part}, line {i}): {lines[int(i) - 1 + 3 * (part == '2')]}" in r.stdout
    assert table_cli.run([str(table), "--root", root, "--dry-run"])["to_run"] == 0
    first = shlex.split(lines[0])
    done = os.path.join(first[first.index("--workdir") + 1], jobs_lib.DONE)
    assert json.load(open(done))["rc"] == 0
    open(done, "w").close()  # as the `touch` of earlier versions' lines left it: still read
    assert main.main(["table", str(table), "--root", root, "--collect-only"]) == 0
    assert "| shot | **50.0 ± 0.0** (2) |" in open(os.path.join(root, "t.md")).read()
    r = array("jobs.txt", "2", SLURM_ARRAY_TASK_ID="3", **task)
    assert r.returncode == 2 and "has no line 3 in part 2" in r.stderr


def test_run_job_passes_sigterm_on_but_not_ctrl_c(tmp_path):
    """A launcher's SIGTERM is passed on to the trainer. Ctrl-C reaches the trainer from the
    terminal's process group by itself; passed on too, it would be a second Ctrl-C, which kills
    the trainer before it saves: `run_job` only keeps waiting."""
    ready = tmp_path / "ready"
    trainer = (
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda *a: got.append('INT'))\n"
        "signal.signal(signal.SIGTERM, lambda *a: got.append('TERM'))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "while 'TERM' not in got: time.sleep(0.02)\n"
        "sys.exit(75 if got == ['TERM'] else 99)\n"
    )
    cmd = [sys.executable, "-m", "xmodal_jax.tables.run_job", str(tmp_path / "wd"), "--"]
    proc = subprocess.Popen(
        [*cmd, sys.executable, "-c", trainer],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # still waiting for its trainer
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == EXIT_PREEMPTED, proc.stderr.read()
    assert jobs_lib.status(str(tmp_path / "wd")) == "unfinished"


@pytest.mark.parametrize("form", ["run_job", "run && mark"])
def test_a_slurm_array_task_passes_the_time_limit_signal_to_its_run(tmp_path, form):
    """SLURM signals the batch script (B:TERM); the run gets it, saves (here: exits 75). Lines
    of today's dry runs run the trainer under `run_job`; earlier ones were `RUN && MARK`."""
    ready = tmp_path / "ready"
    sleeper = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
               f"open({str(ready)!r}, 'w').close(); time.sleep(60)")  # fmt: skip
    run = [sys.executable, "-c", sleeper]
    if form == "run_job":
        run = [sys.executable, "-m", "xmodal_jax.tables.run_job", str(tmp_path / "wd"), "--", *run]
        line = shlex.join(run)
    else:
        line = f"{shlex.join(run)} && touch {tmp_path}/done"
    (tmp_path / "jobs.txt").write_text(line + "\n")
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_ARRAY_TASK_ID": "1",
           "XMODAL_REQUEUE": "0"}  # fmt: skip
    proc = subprocess.Popen(["bash", ARRAY, "jobs.txt"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == EXIT_PREEMPTED
    assert not (tmp_path / "done").exists() and not (tmp_path / "wd" / jobs_lib.DONE).exists()
    if form == "run_job":
        assert jobs_lib.status(str(tmp_path / "wd")) == "unfinished"


# ------------------------------------------------------------------ 3, 7: unreadable checkpoints


def test_every_checkpoint_unreadable_stops_and_changes_nothing(config, trained):
    for step in (STEPS // 2, STEPS):
        _corrupt(trained, step)
    before = _digest(trained)
    rc, out, err = _xmodal("train", "--config", config, "--workdir", trained)
    line = _one_line(err)
    assert rc == 2 and f"steps {STEPS}, {STEPS // 2}" in line and "can be read" in line
    assert "nothing was moved or changed" in line and f"mv {trained}/checkpoints " in line
    assert _digest(trained) == before


def test_an_unreadable_latest_checkpoint_is_one_warning(config, trained, lone, capfd):
    _corrupt(trained, STEPS)
    os.remove(os.path.join(trained, "summary.json"))
    rc, out, err = _xmodal("train", "--config", config, "--workdir", trained)
    fd_out, fd_err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    (warning,) = [line for line in out.splitlines() if "WARNING" in line]
    assert f"skipping checkpoint {STEPS} " in warning
    assert f"resuming from step {STEPS // 2}" in warning  # between two log steps: the same log
    for text in (out, err, fd_out, fd_err):  # TensorStore's tracebacks went to the log file
        assert "Traceback" not in text and "Event loop is closed" not in text
    aside = os.path.join(trained, "checkpoints_incomplete")
    (log,) = [n for n in os.listdir(aside) if n.endswith(".log")]
    assert "OUT_OF_RANGE" in open(os.path.join(aside, log)).read()
    _same_run(trained, lone[0])


# ------------------------------------------------------------------ 4: config.json


def test_config_json_survives_a_refused_start_and_is_kept_when_it_changes(config, trained):
    before = _digest(trained)
    rc, _, err = _xmodal("train", "--config", config, "--workdir", trained,
                         "--config.model.bottleneck=64")  # fmt: skip
    assert rc == 2 and "does not fit" in _one_line(err)
    assert _digest(trained) == before

    # Finished already: the rerun with another log_every only evaluates, and records both.
    old = open(os.path.join(trained, "config.json")).read()
    rc, out, err = _xmodal("train", "--config", config, "--workdir", trained,
                           "--config.log_every=5")  # fmt: skip
    assert rc == 0, err[-3000:]
    assert open(os.path.join(trained, f"config.{STEPS}.json")).read() == old
    with open(os.path.join(trained, "config.json")) as f:
        assert json.load(f)["log_every"] == 5


# ------------------------------------------------------------------ 6: bad input


def _deny_writes(monkeypatch, path: str) -> None:
    """`path` read-only: by its mode bits, or (for root, whom mode bits do not stop) by what
    `os.access` answers, which is what the workdir check asks."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return
    access = os.access
    monkeypatch.setattr(
        os, "access",
        lambda p, mode, **kw: False if (mode & os.W_OK and os.fspath(p).startswith(path))
        else access(p, mode, **kw),
    )  # fmt: skip


BAD_INPUTS = {
    "total_steps=0": (["--config.total_steps=0"], "config.total_steps=0 must be a positive"),
    "log_every=0": (["--config.log_every=0"], "config.log_every=0 must be a positive"),
    "batch_size=-64": (["--config.batch_size=-64"], "config.batch_size=-64 must be a positive"),
    "config syntax": ([], "has a syntax error at line 2"),
    "config argument": ([], "get_config('direction=x2y') failed"),
    "workdir is a file": ([], "is a file, not a directory"),
    "read-only workdir": ([], "is not writable by this user; choose another --workdir"),
    "tfds dir unwritable": ([], "set TFDS_DATA_DIR to a directory this user can write"),
    "past total_steps": (["--config.total_steps=100"], "is past config.total_steps=100"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_exit_2_and_one_line(case, config, trained, tmp_path, monkeypatch):
    args, words = BAD_INPUTS[case]
    workdir = str(tmp_path / "new")  # must not be created
    if case == "config syntax":
        config = str(tmp_path / "syntax.py")
        open(config, "w").write("def get_config(arg=None):\n    return {\n")
    elif case == "config argument":
        config = os.path.join(ROOT, "experiments", "digits", "source_only.py:direction=x2y")
    elif case == "workdir is a file":
        workdir = str(tmp_path / "file")
        open(workdir, "w").close()
    elif case == "read-only workdir":
        workdir = trained
        _deny_writes(monkeypatch, workdir)
    elif case == "tfds dir unwritable":
        open(tmp_path / "file", "w").close()
        monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "file" / "tfds"))
    elif case == "past total_steps":
        workdir = trained
    existed, before = os.path.exists(workdir), _digest(workdir)
    rc, out, err = _xmodal("train", "--config", config, "--workdir", workdir, *args)
    assert rc == 2 and words in _one_line(err), err
    assert os.path.exists(workdir) == existed and _digest(workdir) == before
    assert "Results in" not in out


def test_eval_names_its_step_and_prints_what_it_cannot_save(config, trained, tmp_path, monkeypatch):
    rc, _, err = _xmodal("eval", "--config", config, "--workdir", str(tmp_path / "typo"))
    assert rc == 2 and "does not exist" in _one_line(err)
    assert not os.path.exists(tmp_path / "typo")  # a mistyped workdir is not created

    _deny_writes(monkeypatch, trained)
    before = _digest(trained)
    rc, out, err = _xmodal("eval", "--config", config, "--workdir", trained)
    assert rc == 2 and "results above were not saved" in _one_line(err)
    assert f"Evaluating the checkpoint of step {STEPS} in {trained}/checkpoints" in out
    assert "[1/1] target: accuracy=" in out
    assert _digest(trained) == before


def test_an_object_array_npz_is_one_line(tmp_path):
    np.savez(tmp_path / "w.npz", a=np.array([{"x": 1}], dtype=object))
    rc, _, err = _xmodal("convert", str(tmp_path / "w.npz"), str(tmp_path / "w.safetensors"))
    assert rc == 2 and "object arrays are pickles" in _one_line(err)


# ------------------------------------------------------------------ 7: what a user reads


def test_the_end_of_a_run_is_short_and_names_what_exists(lone):
    workdir, out = lone
    lines = out.splitlines()
    final = lines.index(f"Final evaluation at step {STEPS}:")
    assert lines[final + 1].startswith("  target: accuracy=") and "class_accuracy/" not in out
    shown = [line for line in lines[final + 1 :] if line.startswith("  ")]
    assert len(shown) == 1 and len(shown[0]) < 120  # one short line per evaluator
    (results,) = [line for line in lines if line.startswith("Results in")]
    named = results.split(": ", 1)[1].split(" (")[0].split(", ")
    assert named and all(os.path.exists(os.path.join(workdir, n)) for n in named)


def test_help_version_and_a_fast_bench_help(capsys):
    with pytest.raises(SystemExit):
        main.main(["--version"])
    assert capsys.readouterr().out.startswith("xmodal 0.")
    with pytest.raises(SystemExit):
        main.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--config.KEY=VALUE" in text and "resumes" in text and f"{EXIT_PREEMPTED}" in text
    code = (
        "import sys\nfrom xmodal_jax.bench import cli\ncli._parser()\nprint('jax' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "False", r.stderr  # bench parses its arguments before JAX
