"""The `xmodal` command: `train` and `eval` an experiment config in a workdir, `convert` weights.

    xmodal train --config experiments/X.py[:k=v,...] --workdir DIR [--config.a.b=value ...]
    xmodal eval  --config experiments/X.py[:k=v,...] --workdir DIR
    xmodal convert SRC DST [--arch NAME]   # PyTorch / safetensors / .npz -> our safetensors
    xmodal table experiments/tables/NAME.py --root DIR [--jobs K] [--dry-run]
                 [--select last|source_val|oracle]
    xmodal bench [--small] [--json PATH]

A train run in a workdir that holds checkpoints resumes from the latest one.
"""

from __future__ import annotations

import argparse
import json
import sys

from xmodal_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmodal", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, text in (("train", "train (or resume) a config"), ("eval", "evaluate a workdir")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("--config", required=True, help="experiments/X.py[:k=v,...]")
        p.add_argument("--workdir", required=True, help="where checkpoints and logs go")
    p = verbs.add_parser("convert", help="convert a foreign checkpoint for pretrained.load")
    p.add_argument("src", help="a .pth / .bin / .safetensors / .npz file or an HF folder")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument("--arch", default=None, help="architecture name when it cannot be inferred")
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
    import xmodal_jax.data  # noqa: F401  (registers the embedded datasets)
    from xmodal_jax.train import metrics, trainer

    workdir = metrics.workdir_path(args.workdir)  # local (made absolute) or gs://...
    if args.verb == "train":
        results = trainer.train_and_evaluate(config, workdir)
    else:
        results = trainer.evaluate(config, workdir)
    print(json.dumps(results, indent=1, sort_keys=True))
    print(f"Results in {workdir}: summary.json, metrics.jsonl, plots/, checkpoints/")
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (UserError, FileNotFoundError) as e:
        print(f"xmodal: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"xmodal: training diverged: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
