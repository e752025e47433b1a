"""The exceptions the CLI turns into exit codes, and the codes (docs/DESIGN.md §4).

0: finished (`train` reached `total_steps` and wrote `summary.json`); 2: a `UserError`;
3: training diverged; 75 (`EX_TEMPFAIL`): preempted, saved, rerun to resume; 130: aborted
(a second Ctrl-C, or Ctrl-C outside training).
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
EXIT_ABORTED = 130


class UserError(ValueError):
    """A bad config, name or file; the CLI prints its message as one line and exits 2."""


class Preempted(Exception):
    """Training stopped early on SIGTERM or Ctrl-C after saving a checkpoint; rerunning the
    same command resumes it. The CLI prints the message and exits `EXIT_PREEMPTED`."""
