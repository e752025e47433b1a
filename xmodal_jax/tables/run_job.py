"""One line of `xmodal table --dry-run`: a table job run as `xmodal table` runs it.

    python -m xmodal_jax.tables.run_job WORKDIR -- python -m xmodal_jax.main train ...

Runs the training command with its output passed through (and, for a local workdir, appended to
the workdir's `log.txt`), SIGTERM passed on to it (the trainer saves and exits 75; Ctrl-C
reaches it from the terminal),
then writes the job's marker as the table runner does (`runner.finish`): `done` with the wall
and CPU times, `diverged` with what the trainer said (a result of its seed: never run again),
`failed` with the exit status, and nothing when preempted, so the next dry run prints the job
again to resume it. Exits with the command's status (1 where it exited 0 without writing
`summary.json`: failed, as the marker says). A local workdir's lock is held for the run, as the
runner holds it (a remote workdir's lease is the trainer's own); a job that has already ended is
not run again (a jobs file run twice, or a requeued task).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from xmodal_jax.errors import EXIT_USER_ERROR
from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import runner
from xmodal_jax.train import metrics as metrics_lib

USAGE = "usage: python -m xmodal_jax.tables.run_job WORKDIR -- COMMAND..."
_TAIL = 1 << 16  # bytes of output kept for a diverged run's message (remote workdirs)


def _pass_through(proc: subprocess.Popen, log_path: str | None) -> str:
    """Copies the command's output to stdout (and the log) as it comes; returns its tail."""
    tail, echo = b"", True
    log = open(log_path, "ab") if log_path else None
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            if echo:
                try:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                except OSError:  # stdout gone (a closed pipe): the run goes on, logged
                    echo = False
            if log:
                log.write(chunk)
                log.flush()
            tail = (tail + chunk)[-_TAIL:]
    finally:
        if log:
            log.close()
    return tail.decode(errors="replace")


def run(workdir: str, command: list[str]) -> int:
    """Runs `command` as the job of `workdir`, writes its marker; returns its exit status."""
    state = jobs_lib.status(workdir)
    if state in jobs_lib.ENDED:
        print(f"{workdir}: already {state}, not run again.", flush=True)
        return 0
    local = not metrics_lib.is_remote(workdir)
    lock_fd, log_path = None, None
    if local:
        os.makedirs(workdir, exist_ok=True)
        lock_fd = runner.lock(workdir)
        if lock_fd is None:
            print(f"{workdir}: another process runs this job; not started.", file=sys.stderr)
            return EXIT_USER_ERROR
        log_path = os.path.join(workdir, jobs_lib.LOG)
    runner.begin(workdir, command)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        pass_fds=() if lock_fd is None else (lock_fd,),
        env=runner.trainer_env(lock_fd),
    )
    # SIGTERM (a launcher's) is passed on. Ctrl-C reaches the trainer from the terminal itself
    # (one process group): passed on as well it would be a second Ctrl-C, which kills the
    # trainer before it saves, so here it only keeps this process waiting for the trainer.
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: proc.send_signal(signum)),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
    }
    try:
        output = _pass_through(proc, log_path)
        cpu = runner.wait(proc)
        rc = proc.returncode
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    outcome = runner.finish(workdir, rc, time.monotonic() - t0, output, cpu)
    if lock_fd is not None:
        os.close(lock_fd)
    said = f"exit {rc}"
    if outcome == "failed" and rc == 0:  # no summary.json: not a result, so not a success
        said, rc = "exit 0, no summary.json", 1
    print(f"xmodal table: {outcome} ({said}): {workdir}", file=sys.stderr, flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return EXIT_USER_ERROR
    return run(argv[0], argv[2:])


if __name__ == "__main__":
    sys.exit(main())
