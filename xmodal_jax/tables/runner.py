"""Runs a table's jobs as `xmodal train` subprocesses, K at a time, resumably.

A job whose workdir holds the `done` marker is skipped; any other job is (re)started in its
workdir, where the trainer resumes from its latest checkpoint. Output goes to the workdir's
`log.txt` (appended, so the log of a failed attempt is kept); a failure writes the `failed`
marker with the exit status and does not stop the other jobs. A job that exits with the
preemption code (75: stopped by a signal after saving) gets no marker: it is unfinished, and the
next command resumes it. A running job holds an exclusive lock on its workdir's `lock` file
(`workdir_lock`; handed to its trainer process, so the lock lasts as long as either lives): a
second table command on the same root, or an `xmodal train` there, is refused instead of running
it twice. Ctrl-C or SIGTERM stops the running jobs (each saves, or, past its last step, ends its
run and is marked done) and raises `Preempted`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from etils import epath

from xmodal_jax import cache_dirs
from xmodal_jax.errors import EXIT_DIVERGED, EXIT_PREEMPTED, Preempted
from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.train import metrics as metrics_lib
from xmodal_jax.train import workdir_lock

# The program a job runs; tests replace it with a fake trainer.
PROGRAM: list[str] = [sys.executable, "-m", "xmodal_jax.main"]


def _write(path: str, obj: dict) -> None:
    metrics_lib.write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def lock(workdir: str) -> int | None:
    """An open file descriptor holding the workdir's lock, or None if another process has it."""
    return workdir_lock.flock(os.path.join(workdir, jobs_lib.LOCK), "xmodal table")


def begin(workdir: str, cmd: list[str]) -> None:
    """Before a job's process starts (here or in `run_job`): its `failed` marker of an earlier
    attempt goes, and a local workdir's log gets the command and the time."""
    failed = epath.Path(workdir) / jobs_lib.FAILED
    if failed.exists():
        failed.unlink()
    if not metrics_lib.is_remote(workdir):
        with open(os.path.join(workdir, jobs_lib.LOG), "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n# started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")


def _start(job: jobs_lib.Job, workdir: str, lock_fd: int) -> tuple[subprocess.Popen, float]:
    _write(os.path.join(workdir, jobs_lib.JOB), job.describe())
    cmd = job.command(workdir, PROGRAM)
    begin(workdir, cmd)
    with open(os.path.join(workdir, jobs_lib.LOG), "a") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            pass_fds=(lock_fd,),  # the trainer keeps the lock if this process dies first
            env=trainer_env(lock_fd),
        )
    return proc, time.monotonic()


def trainer_env(lock_fd: int | None) -> dict[str, str]:
    """A job's environment: the workdir lock's descriptor (the trainer knows the lock is its
    own; None: the trainer takes the lock itself), and JAX's persistent compilation cache
    (`cache_dirs.compilation_cache_dir`), so the runs of a table that share a config's shapes
    compile their train step once per machine."""
    env = {**os.environ, cache_dirs.COMPILATION_CACHE_ENV: cache_dirs.compilation_cache_dir()}
    if lock_fd is not None:
        env[workdir_lock.FD_ENV] = str(lock_fd)
    return env


DIVERGED_SAYS = "training diverged: "  # main.py's line for EXIT_DIVERGED
# What `run` returns workdirs by (and `xmodal table` counts).
OUTCOMES = ("skipped", "done", "diverged", "failed", "preempted", "busy", "blocked")


def divergence(workdir: str, output: str | None = None) -> str:
    """What the trainer said when it stopped a diverged run: the last such line of `output`,
    else of the workdir's log."""
    if output is None:
        with open(os.path.join(workdir, jobs_lib.LOG), errors="replace") as log:
            output = log.read()
    said = ""
    for line in output.splitlines():
        if DIVERGED_SAYS in line:
            said = line.split(DIVERGED_SAYS, 1)[1].split(". Stopped;", 1)[0].strip()
    return said or "no message in its log"


def said(workdir: str) -> str:
    """What a diverged job's marker keeps of the trainer's message."""
    with open(os.path.join(workdir, jobs_lib.DIVERGED)) as f:
        return json.load(f)["said"]


def wait(proc: subprocess.Popen, block: bool = True) -> float | None:
    """Waits for `proc` to exit (`block=False`: only looks) and sets its `returncode`; returns
    the CPU seconds (user + system) it and the processes it waited for used, None while it runs
    (`returncode` None) or where it was reaped before. The CPU time, unlike the wall time,
    leaves out time the job was stopped (SIGSTOP) or waited for a core another process held;
    `subprocess` reaps without it, hence `os.wait4`."""
    if proc.returncode is not None:  # reaped already: its usage is gone
        return None
    pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def finish(
    workdir: str, rc: int, wall_s: float, output: str | None = None, cpu_s: float | None = None
) -> str:
    """'done', 'preempted' (no marker: the job is unfinished), 'diverged' or 'failed'; writes
    the marker (local or remote workdir) with the run's wall time and, where known, its CPU
    time (`wait`). A diverged run's marker keeps what the trainer said, found in `output` (else
    in the workdir's log)."""
    if rc == EXIT_PREEMPTED:
        return "preempted"
    info = {"rc": rc, "wall_s": round(wall_s, 1), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cpu_s is not None:
        info["cpu_s"] = round(cpu_s, 1)
    if rc == EXIT_DIVERGED:
        said_ = divergence(workdir, output)
        _write(os.path.join(workdir, jobs_lib.DIVERGED), {**info, "said": said_})
        return "diverged"
    ok = rc == 0 and (epath.Path(workdir) / "summary.json").exists()
    _write(os.path.join(workdir, jobs_lib.DONE if ok else jobs_lib.FAILED), info)
    return "done" if ok else "failed"


def _next_ready(todo: list[tuple[jobs_lib.Job, str]]) -> int | None:
    """Index of the first job whose needed jobs are all done (None: every one waits)."""
    for i, (job, wd) in enumerate(todo):
        needed = job.needed_workdirs(wd).values()
        if all(jobs_lib.status(n) == "done" for n in needed):
            return i
    return None


def _blocker(job: jobs_lib.Job, workdir: str) -> str:
    unfinished = {
        arg: f"{n} ({jobs_lib.status(n)})"
        for arg, n in job.needed_workdirs(workdir).items()
        if jobs_lib.status(n) != "done"
    }
    return "needs " + ", ".join(f"{a}={w}" for a, w in unfinished.items()) + "; run it first"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the jobs as Ctrl-C does


def run(
    jobs: Sequence[jobs_lib.Job],
    workdirs: Sequence[str],
    parallel: int = 1,
    report: Callable[[str], None] = lambda line: print(line, flush=True),
    on_done: Callable[[str], None] | None = None,
) -> dict[str, list[str]]:
    """Runs the unfinished jobs, `parallel` at a time, a job that needs another (a row's
    `needs`) once that one is done; returns workdirs by outcome ('skipped', 'done', 'diverged':
    its training diverged, an outcome not retried; 'failed', 'preempted': stopped by a signal,
    saved; 'busy': run by another process; 'blocked': a job it needs did not finish).
    `on_done(workdir)` is called as each job ends done or diverged (both are results).
    Raises `Preempted` when Ctrl-C or SIGTERM stops it (the running jobs save first)."""
    out: dict[str, list[str]] = {k: [] for k in OUTCOMES}
    todo, diverged = [], 0
    for job, wd in zip(jobs, workdirs, strict=True):
        state = jobs_lib.status(wd)
        if state in jobs_lib.ENDED:
            out["skipped"].append(wd)
            diverged += state == "diverged"
        else:
            todo.append((job, wd))
    if out["skipped"]:
        line = f"{len(out['skipped'])} of {len(jobs)} jobs already done (skipped)"
        if diverged:
            line += f", {diverged} of them diverged (delete a `{jobs_lib.DIVERGED}` file to retry)"
        report(line + ".")
    running: dict[str, tuple[jobs_lib.Job, subprocess.Popen, float, int]] = {}
    total, finished = len(todo), 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        while todo or running:
            while todo and len(running) < max(1, parallel):
                ready = _next_ready(todo)
                if ready is None:
                    if not running:  # what the rest needs will not finish in this command
                        for job, wd in todo:
                            out["blocked"].append(wd)
                            report(f"blocked: {job.row} seed={job.seed}: {_blocker(job, wd)}")
                        total -= len(todo)
                        todo.clear()
                    break
                job, wd = todo.pop(ready)
                fd = lock(wd)
                if fd is None:
                    out["busy"].append(wd)
                    total -= 1
                    report(f"busy (another process runs it): {job.row} seed={job.seed} {wd}")
                    continue
                if jobs_lib.status(wd) in jobs_lib.ENDED:  # ended by another command
                    os.close(fd)
                    out["skipped"].append(wd)
                    total -= 1
                    continue
                proc, t0 = _start(job, wd, fd)
                running[wd] = (job, proc, t0, fd)
                report(f"started {job.row} seed={job.seed} {job.spec} -> {wd}")
            time.sleep(0.2)
            for wd, (job, proc, t0, fd) in list(running.items()):
                cpu = wait(proc, block=False)
                if proc.returncode is None:
                    continue
                rc = proc.returncode
                del running[wd]
                finished += 1
                wall = time.monotonic() - t0
                outcome = finish(wd, rc, wall, cpu_s=cpu)
                os.close(fd)
                out[outcome].append(wd)
                what = {
                    "done": "done",
                    "diverged": "diverged ({}; reported as such, not retried)",
                    "preempted": f"preempted (exit {rc}; saved, resumes on the next run)",
                    "failed": f"FAILED (exit {rc}; log: {wd}/{jobs_lib.LOG})",
                }[outcome]
                if outcome == "diverged":  # what the trainer said, as its marker keeps it
                    what = what.format(said(wd))
                report(f"[{finished}/{total}] {what}: {job.row} seed={job.seed} ({wall:.0f} s)")
                if outcome in jobs_lib.ENDED and on_done is not None:
                    on_done(wd)
    except KeyboardInterrupt:
        # SIGTERM makes each trainer save a checkpoint and exit 75: the next run resumes. A
        # trainer past its last step (in its final evaluation, say) ends its run instead: that
        # job is done, and marked so, not run again.
        for _, proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        ended = 0
        for wd, (job, proc, t0, _) in running.items():
            cpu = wait(proc)
            if proc.returncode == 0 and finish(wd, 0, time.monotonic() - t0, cpu_s=cpu) == "done":
                ended += 1
                report(f"done while stopping: {job.row} seed={job.seed}")
                if on_done is not None:
                    on_done(wd)
        raise Preempted(
            f"stopped; {len(running) - ended} running job(s) saved, {ended} finished and "
            f"{len(todo)} not started. Rerun the same command to resume them."
        ) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return out
