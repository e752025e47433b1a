"""Regression tier (`make test-slow`): reruns headline runs from their committed records and
requires the same figures on the pinned software stack.

Each case names a committed table record (table, row, seed, config arguments); the run is
repeated with exactly the record's config, arguments, seed and overrides, in a process of its own
with the record's XLA:CPU convolution setting (`xla_defaults`; XLA reads its flags once a
process, and a record made before the project's default ran YNNPACK's), the depthwise form its
`depthwise='auto'` ran on CPU (`layers.cpu_depthwise`; `shift` before the field), its residual
streams' setting (`residuals.cpu_residuals`; `fused` before the field) and a feature
cache of its own (a cached locked-tower feature would hide a change to the tower), and every
metric the table reads must equal the record's to 1e-6. A case whose record was made on another
device count or software stack (its provenance says so) fails with the reason: such a record is
stale here, and is to be rerun, not compared loosely.

The processor is the exception: XLA:CPU compiles for the host's vector extensions, so the same
code gives other last bits on another processor (its model name, vector extension and, where
recorded, x86 family and model). Where the record names another processor, or names none and
differs, the record's own commit (`git archive` of it, in its own data and cache directories)
is run here beside this tree, and the two runs must agree to 1e-6: that the code changed no
result is then shown on this machine, whatever made the record.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from xmodal_jax import cache_dirs, provenance, xla_defaults
from xmodal_jax.models import layers, residuals
from xmodal_jax.tables import records, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "tables", "results")

# (table, row label, seed, config arguments of the column)
CASES = [
    ("animals_zeroshot", "quick start (CLIP, towers locked)", 0, {}),
    ("digits_da", "source_only", 0, {"direction": "m2u"}),
    ("digits_da", "dann", 0, {"direction": "m2u"}),
    ("transfer_ablation", "layer-wise LR decay", 0, {}),
]
# The longest case, in a class of its own: `make test-slow`'s `--dist loadscope` keeps a module's
# tests on one worker and a class's apart from them, so the two workers share the cases. Both
# towers trained, recorded before `cpu_depthwise`: it reruns with the `shift` form.
LONG_CASES = [("animals_zeroshot", "unlocked (both towers trained)", 0, {"split": "0"})]


def _ids(cases: list[tuple]) -> list[str]:
    return [f"{c[0]}:{c[1]}:{c[2]}" for c in cases]


def _record(table: str, row: str, seed: int, args: dict) -> dict:
    path = os.path.join(RESULTS, f"{table}.runs.jsonl")
    found = [
        r for r in records.load(path) if r["row"] == row and r["seed"] == seed and r["args"] == args
    ]
    assert len(found) == 1, f"{table}: {len(found)} records of {row!r} seed {seed} {args}"
    return found[0]


def _environment(rec: dict) -> dict[str, str]:
    """This process's environment with the record's convolution setting in `XLA_FLAGS`, its
    depthwise form on CPU (`layers.cpu_depthwise`; records before the field ran `shift`) and its
    residual streams' setting (`residuals.cpu_residuals`; records before the field: `fused`)."""
    env = dict(os.environ)
    flags = [
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(f"{xla_defaults.NAME}=")
    ]
    theirs = (rec.get("provenance") or {}).get("cpu_convolutions", "ynnpack")
    keep_ynnpack = f"{xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}"
    flags.append(xla_defaults.FLAG if theirs == "xla" else keep_ynnpack)
    env["XLA_FLAGS"] = " ".join(flags)
    env[layers.CPU_DEPTHWISE_ENV] = (rec.get("provenance") or {}).get("cpu_depthwise", "shift")
    env[residuals.CPU_RESIDUALS_ENV] = (rec.get("provenance") or {}).get("cpu_residuals", "fused")
    return env


def _comparable(rec: dict) -> str | None:
    """Why the record cannot be reproduced here, by any code, or None."""
    prov = rec.get("provenance") or {}
    here = provenance.versions()
    if prov:
        theirs = prov.get("versions", {})
        for pkg in ("jax", "jaxlib", "flax", "optax"):
            if theirs.get(pkg) != here[pkg]:
                return f"recorded with {pkg} {theirs.get(pkg)}, here {here[pkg]}"
        if prov.get("platform") != "cpu":
            return f"recorded on {prov.get('platform')}"
        if prov.get("device_count") != jax.device_count():
            return f"recorded on {prov.get('device_count')} devices, here {jax.device_count()}"
        # Records older than `usable_cpus` were made by unpinned table jobs: all cores usable.
        cores = prov.get("usable_cpus", prov.get("cpu_count"))
        if cores != provenance.usable_cpus():
            return (
                f"recorded with {cores} usable cores, here {provenance.usable_cpus()} (XLA:CPU "
                "splits its work by the thread count; run the tier unpinned on that many cores)"
            )
        return None
    machine = (rec.get("done") or {}).get("machine", "")
    if "CPU" not in machine or f"jax {here['jax']}" not in machine:
        return f"recorded on {machine or 'an unrecorded machine'}"
    return None


def _other_processor(rec: dict) -> str | None:
    """The record's processor where it is not this one, '' where the record names none (made
    before `cpu_simd`), None where it is this one. One model name and vector extension may
    cover x86 generations that differ in their last bits: where the record names the family and
    model (`cpu_family`) they must match too; a record made before that field, with this name,
    counts as naming none."""
    prov = rec.get("provenance") or {}
    if prov.get("cpu_simd") is None:
        return ""
    theirs = (prov.get("cpu_model"), prov.get("cpu_simd"))
    here = (provenance.cpu_model(), provenance.cpu_simd())
    if theirs != here:
        return ", ".join(map(str, theirs))
    if "cpu_family" not in prov:
        return ""
    same = prov["cpu_family"] == provenance.cpu_family()
    return None if same else ", ".join(map(str, (*theirs, prov["cpu_family"] or "no family")))


def _reference_tree(rec: dict, dest: str) -> str:
    """The source tree of the record's commit, unpacked at `dest`."""
    git = (rec.get("provenance") or {}).get("git") or {}
    commit = git.get("commit")
    if not commit or git.get("dirty") or git.get("changed"):
        pytest.fail(
            f"the record names no clean commit ({git}), so its code cannot be run here beside "
            "this tree; rerun the record on this processor"
        )
    probe = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{commit}^{{commit}}"])
    if probe.returncode:
        pytest.fail(
            f"the record's commit {commit[:12]} is not in this clone's history (a shallow "
            f"clone?): `git fetch --unshallow`, or rerun the record on this processor"
        )
    os.makedirs(dest)
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def _run(rec: dict, seed: int, tree: str, scratch) -> dict:
    """The record's run from the source `tree`, in directories of its own; its summary."""
    cfg = rec["config"] + (":" + ",".join(f"{k}={v}" for k, v in rec["args"].items()))
    workdir = str(scratch / "run")
    argv = ["train", "--config", cfg.rstrip(":"), "--workdir", workdir, f"--config.seed={seed}"]
    argv += [f"--config.{k}={v}" for k, v in rec["overrides"].items()]
    env = _environment(rec) | {cache_dirs.CACHE_ENV: str(scratch / "cache")}
    if tree != ROOT:  # its own datasets, built by its own builders
        env["TFDS_DATA_DIR"] = str(scratch / "tensorflow_datasets")
    cmd = [sys.executable, "-m", "xmodal_jax.main", *argv]
    # `-m` from `tree` imports that tree's package: the working directory comes first on the
    # path, before the editable install's finder.
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(os.path.join(workdir, "provenance.json")) as f:
        ran = json.load(f).get("argv", [tree])[0]  # the trainer's main.py: which tree ran
    assert os.path.realpath(ran).startswith(os.path.realpath(tree) + os.sep), ran
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _differences(ours: dict, theirs: dict, keys: list[str]) -> dict[str, tuple]:
    return {k: (ours[k], theirs[k]) for k in keys if ours[k] != pytest.approx(theirs[k], abs=1e-6)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_rerun_equals_its_record(case, tfds_dir, tmp_path):
    _rerun_equals_its_record(case, tmp_path)


class TestLongCase:
    @pytest.mark.slow
    @pytest.mark.parametrize("case", LONG_CASES, ids=_ids(LONG_CASES))
    def test_rerun_equals_its_record(self, case, tfds_dir, tmp_path):
        _rerun_equals_its_record(case, tmp_path)


def _rerun_equals_its_record(case: tuple, tmp_path) -> None:
    table_name, row, seed, args = case
    rec = _record(table_name, row, seed, args)
    reason = _comparable(rec)
    if reason:
        pytest.fail(f"the record is not comparable bit for bit here: {reason}; rerun it")
    _, table = spec.load(os.path.join(ROOT, "experiments", "tables", f"{table_name}.py"))
    summary = _run(rec, seed, ROOT, tmp_path / "head")
    keys = sorted(records.table_metrics(table) & set(rec["summary"]))
    assert keys
    other = _other_processor(rec)
    moved = _differences(summary, rec["summary"], keys)
    if other is not None and (other or moved):
        tree = _reference_tree(rec, str(tmp_path / "reference_tree"))
        commit = rec["provenance"]["git"]["commit"][:12]
        reference = _run(rec, seed, tree, tmp_path / "reference")
        changed = _differences(summary, reference, keys)
        assert not changed, f"this tree vs the record's commit {commit}, both run here: {changed}"
        print(
            f"{table_name}: {row}: recorded on {other or 'an unnamed processor'}; this tree "
            f"and the record's commit {commit} agree here (against the record: {moved or 'equal'})"
        )
    else:
        assert not moved, f"this run vs its record: {moved}"
    if row.startswith("quick start"):  # the quick start's headline claim, not only its value
        unseen = summary["eval/zeroshot_unseen/accuracy"]
        assert unseen >= summary["eval/zeroshot_unseen_control/accuracy"] + 0.10


def test_a_record_of_another_processor_is_compared_through_its_commit_run_here(tmp_path):
    here = {"versions": provenance.versions(), "platform": "cpu"}
    here |= {"device_count": jax.device_count(), "usable_cpus": provenance.usable_cpus()}
    cpu = {"cpu_model": provenance.cpu_model(), "cpu_simd": provenance.cpu_simd()}
    assert _comparable({"provenance": here}) is None
    assert _other_processor({"provenance": here}) == ""  # before the fields: unnamed
    assert _other_processor({"provenance": {**here, **cpu}}) == ""  # same name, no family
    cpu["cpu_family"] = provenance.cpu_family()
    assert _other_processor({"provenance": {**here, **cpu}}) is None
    gen = {**here, **cpu, "cpu_family": "family 0, model 0"}  # another generation, same name
    want = f"{cpu['cpu_model']}, {cpu['cpu_simd']}, family 0, model 0"
    assert _other_processor({"provenance": gen}) == want
    other = {**here, **cpu, "cpu_simd": "AVX-512" if cpu["cpu_simd"] != "AVX-512" else "AVX2"}
    assert _comparable({"provenance": other}) is None
    assert _other_processor({"provenance": other}) == f"{cpu['cpu_model']}, {other['cpu_simd']}"
    fewer = {**here, "usable_cpus": provenance.usable_cpus() + 1}
    assert "usable cores" in _comparable({"provenance": fewer})

    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    rec = {"provenance": {"git": {"commit": head.stdout.strip(), "dirty": False}}}
    tree = _reference_tree(rec, str(tmp_path / "tree"))
    committed = subprocess.run(["git", "-C", ROOT, "show", "HEAD:xmodal_jax/provenance.py"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert open(os.path.join(tree, "xmodal_jax", "provenance.py")).read() == committed
    for git in ({"commit": "0" * 40, "dirty": False}, {"commit": "abc", "dirty": True}, {}):
        with pytest.raises(pytest.fail.Exception, match="rerun the record on this processor"):
            _reference_tree({"provenance": {"git": git}}, str(tmp_path / "none"))


def test_a_rerun_gets_its_records_convolution_setting(monkeypatch):
    """Records before `cpu_convolutions` ran YNNPACK's convolutions (XLA's default then); the
    rerun's `XLA_FLAGS` keep the other flags and set the record's choice, whatever this
    process's own was."""
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {xla_defaults.FLAG}")
    old = _environment({"provenance": {"platform": "cpu"}})["XLA_FLAGS"]
    assert old.split() == [
        "--xla_force_host_platform_device_count=1",
        f"{xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}",
    ]
    assert xla_defaults.cpu_convolutions({"XLA_FLAGS": old}) == "ynnpack"
    new = _environment({"provenance": {"cpu_convolutions": "xla"}})
    assert xla_defaults.cpu_convolutions(new) == "xla"


@pytest.mark.parametrize(
    "env, read, field, before, now",
    [
        (layers.CPU_DEPTHWISE_ENV, layers.cpu_depthwise, "cpu_depthwise", "shift", "shift_vjp"),
        (residuals.CPU_RESIDUALS_ENV, residuals.cpu_residuals, "cpu_residuals", "fused", "stored"),
    ],
    ids=["depthwise", "residuals"],
)
def test_a_rerun_gets_its_records_cpu_setting(monkeypatch, env, read, field, before, now):
    """Records made before a CPU setting's provenance field ran its old value (the depthwise
    form `shift`, the plain residual identity `fused`); a record that names its value gets that
    one, whatever this process's own setting."""
    monkeypatch.setenv(env, now)
    old = _environment({"provenance": {"platform": "cpu"}})
    assert read(old) == before
    monkeypatch.setenv(env, before)
    assert read(_environment({"provenance": {field: now}})) == now
