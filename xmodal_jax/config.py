"""Experiment configs: load `experiments/X.py[:args]`, apply `--config.a.b=value` overrides.

A config file defines `get_config(arg: str | None = None) -> ml_collections.ConfigDict`; `arg`
is the text after the colon, parsed with `parse_arg`. We parse overrides ourselves (instead of
`ml_collections.config_flags`) to give one-line errors that name the closest valid keys.
"""

from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import inspect
import os
import sys
from collections.abc import Collection, Mapping
from typing import Any

import ml_collections

from xmodal_jax.errors import UserError

REQUIRED_KEYS = (
    "seed", "total_steps", "batch_size", "lr", "log_every", "eval_every", "checkpoint_every",
    "keep_checkpoints", "mesh", "model", "data", "evals",
)  # fmt: skip


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"k=v,k2=v2"` over `defaults`; values keep the default's type."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"Config argument {item!r} is not key=value; write e.g. seed=1.")
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=3)
            raise UserError(
                f"Unknown config argument {key!r}; closest: {close}; valid: {sorted(defaults)}."
            )
        default = defaults[key]
        out[key] = type(default)(_literal(value)) if default is not None else _literal(value)
    return out


# Config files that became one file with an argument: the old path names the new form.
MOVED = {
    f"experiments/office31/{method}.py": f"experiments/office31/da.py:method={method}"
    for method in ("source_only", "dann", "dan", "jan", "cdan", "mcc")
}


def _package_root(directory: str) -> str | None:
    """The folder above the outermost package holding `directory` (None if not in a package)."""
    root = None
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        root = directory = os.path.dirname(directory)
    return root


def exec_file(path: str, prefix: str) -> Any:
    """Runs a Python file as a module. A file inside a package (`experiments/` is one) is run
    under its dotted name with the package's parent importable, so it imports shared helpers by
    module path (`from experiments.digits.digits_common import ...`); another file may import
    modules beside it. Exceptions propagate; the import path is restored."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    root = _package_root(directory)
    if root is not None:
        name = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
    else:
        name = prefix + os.path.basename(path)[: -len(".py")]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    entry = root if root is not None else directory
    sys.path.insert(0, entry)
    try:
        mod_spec.loader.exec_module(module)
    finally:
        sys.path.remove(entry)
    return module


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        if (old := os.path.relpath(os.path.abspath(path))) in MOVED:
            new = MOVED[old]
            raise UserError(
                f"Config file {path!r} is now {new!r}; write --config {new}"
                + (f",{arg}" if arg else "")
                + "."
            )
        candidates = [
            p
            for p in glob.glob("experiments/**/*.py", recursive=True)
            if not os.path.basename(p).startswith("_")
        ]
        close = difflib.get_close_matches(path, candidates, n=3, cutoff=0.5)
        raise UserError(f"Config file {path!r} does not exist; closest: {close or candidates[:5]}.")
    try:
        module = exec_file(path, "xmodal_config_")
    except SyntaxError as e:
        raise UserError(
            f"Config file {path!r} has a syntax error at line {e.lineno}: {e.msg}; fix the file."
        ) from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a config's top level raises
        raise UserError(
            f"Config file {path!r} fails to load: {_one_line(e)}; fix the file."
        ) from None
    if not hasattr(module, "get_config"):
        raise UserError(f"Config file {path!r} defines no get_config(arg=None).")
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    if arg and not takes_arg:
        raise UserError(f"Config file {path!r} takes no argument, but ':{arg}' was given.")
    try:
        config = module.get_config(arg or None) if takes_arg else module.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a config rejecting its argument raises anything
        raise UserError(
            f"{spec}: get_config({arg or ''!r}) failed: {_one_line(e).rstrip('.')}; check "
            "the arguments after ':'."
        ) from None
    validate(config, path)
    return config


def options(
    given: Any, defaults: Mapping[str, Any], where: str, *, ignore: Collection[str] = ()
) -> dict[str, Any]:
    """`defaults` updated by `given` (a dict, a ConfigDict or None; keys in `ignore` skipped).
    A key that `defaults` lacks is one error naming it, its closest valid key and the valid
    keys: a misspelt option never falls back to its default silently."""
    items = dict(given.to_dict() if hasattr(given, "to_dict") else (given or {}))
    items = {k: v for k, v in items.items() if k not in ignore}
    unknown = sorted(set(items) - set(defaults))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"{where} has unknown keys {unknown}{hint}; valid keys: {sorted(defaults)}."
        )
    return {**defaults, **items}


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def validate(config: ml_collections.ConfigDict, path: str = "config") -> None:
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise UserError(f"{path} lacks the required keys {missing} (see docs/DESIGN.md §4).")


# The smallest value each count may take (0 for "only at the end").
_MINIMUM = {"total_steps": 1, "batch_size": 1, "log_every": 1, "eval_every": 0,
            "checkpoint_every": 0, "keep_checkpoints": 1}  # fmt: skip


def check_values(config: ml_collections.ConfigDict) -> None:
    """Rejects counts and rates no run can use (`total_steps=0`, `log_every=0`, a negative
    `batch_size`, ...), before any work: one UserError naming the key and what it must be."""
    for key, low in _MINIMUM.items():
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            what = "a positive integer" if low else "an integer >= 0 (0: only at the end)"
            raise UserError(f"config.{key}={value!r} must be {what}; set e.g. --config.{key}=100.")
    lr = config.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 <= lr < float("inf"):
        raise UserError(f"config.lr={lr!r} must be a number >= 0; set e.g. --config.lr=0.01.")


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key path, including the intermediate ConfigDicts."""
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flat_keys(v, prefix + k + "."))
    return keys


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets `config.<key>` (dotted) from a command-line string, keeping the field's type."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        is_dict = isinstance(node, ml_collections.ConfigDict | dict)
        if not is_dict or part not in node:
            close = difflib.get_close_matches(key, flat_keys(config), n=3)
            raise UserError(f"Unknown config key {key!r}; closest valid keys: {close}.")
        if i < len(parts) - 1:
            node = node[part]
    value, old = _literal(text), node[parts[-1]]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and not isinstance(value, type(old)) and not isinstance(old, str):
        if isinstance(old, tuple | list) and isinstance(value, tuple | list):
            value = type(old)(value)
        elif not isinstance(old, ml_collections.ConfigDict):
            raise UserError(
                f"--config.{key}={text}: expected {type(old).__name__} like {old!r}, "
                f"got {type(value).__name__}."
            )
    if isinstance(old, str) and not isinstance(value, str):
        value = text
    node[parts[-1]] = value


def apply_overrides(config: ml_collections.ConfigDict, args: list[str]) -> None:
    """Applies `--config.a.b=value` arguments; anything else is an error."""
    for arg in args:
        name, sep, text = arg.partition("=")
        if not name.startswith("--config.") or not sep:
            raise UserError(f"Unexpected argument {arg!r}; overrides look like --config.lr=0.1.")
        override(config, name[len("--config.") :], text)
