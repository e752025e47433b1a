"""The `xmodal` command: `train` and `eval` an experiment config in a workdir, `convert` weights.

    xmodal train --config experiments/X.py[:k=v,...] --workdir DIR [--config.a.b=value ...]
    xmodal eval  --config experiments/X.py[:k=v,...] --workdir DIR
    xmodal convert SRC DST [--arch NAME]   # PyTorch / safetensors / .npz -> our safetensors
    xmodal table experiments/tables/NAME.py (--root DIR [--records FILE] | --records FILE)
                 [--jobs K] [--dry-run] [--select last|source_val|oracle]
    xmodal bench [--small] [--json PATH]

A train run in a workdir that holds checkpoints resumes from the latest one. Exit codes: 0
finished, 2 bad input (one line says what to fix), 3 training diverged, 75 preempted (saved;
rerun the same command to resume), 130 aborted.
"""

from __future__ import annotations

import argparse
import sys

from xmodal_jax import __version__, malloc_defaults
from xmodal_jax.errors import (
    EXIT_ABORTED,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    Preempted,
    UserError,
)

_TRAIN_EPILOG = f"""\
overrides:
  --config.KEY=VALUE    set any key the config defines, keeping its type
                        (--config.lr=0.05, --config.optimizer.momentum=0.8)

resuming:
  A train in a workdir that holds checkpoints resumes from the newest readable one;
  a larger --config.total_steps continues a finished run. One command at a time may
  use a workdir (a second one is refused, naming the holder).

stopping:
  SIGTERM or Ctrl-C saves after the current step and exits {EXIT_PREEMPTED}; rerun the same
  command to resume. A second Ctrl-C aborts at once without saving.

exit codes:
  0 finished (total_steps reached, summary.json written), {EXIT_USER_ERROR} bad input,
  {EXIT_DIVERGED} diverged, {EXIT_PREEMPTED} preempted (not finished: rerun to resume), \
{EXIT_ABORTED} aborted
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmodal", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"xmodal {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, text, epilog in (
        ("train", "train (or resume) a config", _TRAIN_EPILOG),
        ("eval", "evaluate a workdir's latest checkpoint", None),
    ):
        p = verbs.add_parser(
            verb,
            help=text,
            description=text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            usage=f"xmodal {verb} --config X.py[:k=v,...] --workdir DIR [--config.KEY=VALUE ...]",
        )
        p.add_argument("--config", required=True, help="experiments/X.py[:k=v,...]")
        p.add_argument("--workdir", required=True, help="where checkpoints and logs go")
    p = verbs.add_parser("convert", help="convert a foreign checkpoint for pretrained.load")
    p.add_argument("src", help="a .pth / .bin / .safetensors / .npz file or an HF folder")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument(
        "--arch",
        default=None,
        help="architecture name when it cannot be inferred (a zoo name; for open_clip weights "
        "without open_clip_config.json, open_clip's model name: ViT-B-32, RN50, ...)",
    )
    for verb, text in (
        ("table", "run a table's jobs and write it (xmodal table --help)"),
        ("bench", "measure step throughput and MFU (xmodal bench --help)"),
    ):
        p = verbs.add_parser(verb, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# Verbs with their own argument parsers: `run(argv) -> dict` of these modules.
_DELEGATED = {"table": "xmodal_jax.tables.cli", "bench": "xmodal_jax.bench.cli"}


def run(argv: list[str]) -> dict:
    """Parses `argv` (without the program name) and runs the verb; returns its metrics."""
    if argv and argv[0] in _DELEGATED:
        import importlib

        return importlib.import_module(_DELEGATED[argv[0]]).run(argv[1:])
    args, rest = _parser().parse_known_args(argv)
    if args.verb == "convert":
        if rest:
            raise UserError(f"xmodal convert takes no {rest}; see xmodal convert --help.")
        from xmodal_jax.transfer import convert

        convert.convert(args.src, args.dst, args.arch)
        print(f"Wrote {args.dst}; load it with xmodal_jax.pretrained.load({args.dst!r}).")
        return {}
    from xmodal_jax.parallel import distributed

    distributed.initialize()  # several processes (pod, cluster, launch/): before any JAX work
    from xmodal_jax import config as config_lib

    config = config_lib.load(args.config)
    config_lib.apply_overrides(config, rest)
    config_lib.check_values(config)
    import jax

    from xmodal_jax.train import metrics

    workdir = metrics.workdir_path(args.workdir)  # local (made absolute) or gs://...
    if jax.process_count() == 1:  # answered before the slow imports below; the trainer
        _preflight(args.verb, workdir)  # checks again, on every process count
    import xmodal_jax.data  # noqa: F401  (registers the embedded datasets)
    from xmodal_jax.train import trainer

    if args.verb == "train":
        results = trainer.train_and_evaluate(config, workdir)
    else:
        results = trainer.evaluate(config, workdir)
    names = ("summary.json", "metrics.jsonl", "plots/", "checkpoints/")
    written = [n for n in names if (workdir / n.rstrip("/")).exists()]
    if written:
        print(f"Results in {workdir}: {', '.join(written)} (all metrics in summary.json).")
    return results


def _preflight(verb: str, workdir) -> None:
    """The workdir's cheap checks: usable, and not in use by another command."""
    from xmodal_jax.train import metrics, workdir_lock

    if verb == "train":
        metrics.check_train_workdir(workdir)
        workdir_lock.WorkdirLock(workdir, "xmodal train").check_free()
    else:
        metrics.check_eval_workdir(workdir)
        workdir_lock.WorkdirLock(workdir, "xmodal eval").check_free()
        metrics.check_has_checkpoints(workdir)


def main(argv: list[str] | None = None) -> int:
    """The `xmodal` program: runs `argv` and maps what stopped it to the exit code."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (UserError, FileNotFoundError) as e:
        print(f"xmodal: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FloatingPointError as e:
        print(f"xmodal: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as e:
        print(f"xmodal: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("\nxmodal: interrupted; nothing was saved.", file=sys.stderr)
        return EXIT_ABORTED
    return 0


def cli() -> int:
    """The `xmodal` console script: `main` in a process started with the project's allocator
    setting (`malloc_defaults`: the process restarts itself once to take it)."""
    malloc_defaults.restart_with_defaults()
    return main()


if __name__ == "__main__":
    sys.exit(cli())
