"""Regression tier (`make test-slow`): reruns headline runs from their committed records and
requires the same figures on the pinned software stack.

Each case names a committed table record (table, row, seed, config arguments); the run is
repeated with exactly the record's config, arguments, seed and overrides, in a process of its own
with the record's XLA:CPU convolution setting (`xla_defaults`; XLA reads its flags once a
process, and a record made before the project's default ran YNNPACK's), and every metric the
table reads must equal the record's to 1e-6. A case whose record was made on another machine,
device count or software stack (its provenance says so) fails with the reason: such a record is
stale here, and is to be rerun, not compared loosely.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from xmodal_jax import provenance, xla_defaults
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


def _record(table: str, row: str, seed: int, args: dict) -> dict:
    path = os.path.join(RESULTS, f"{table}.runs.jsonl")
    found = [
        r for r in records.load(path) if r["row"] == row and r["seed"] == seed and r["args"] == args
    ]
    assert len(found) == 1, f"{table}: {len(found)} records of {row!r} seed {seed} {args}"
    return found[0]


def _environment(rec: dict) -> dict[str, str]:
    """This process's environment with the record's convolution setting in `XLA_FLAGS`."""
    env = dict(os.environ)
    flags = [
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(f"{xla_defaults.NAME}=")
    ]
    theirs = (rec.get("provenance") or {}).get("cpu_convolutions", "ynnpack")
    keep_ynnpack = f"{xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}"
    flags.append(xla_defaults.FLAG if theirs == "xla" else keep_ynnpack)
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _comparable(rec: dict) -> str | None:
    """Why the record cannot be reproduced bit for bit here, or None."""
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
        # Records older than `cpu_simd` name no processor: compared, as they were before.
        cpu = (prov.get("cpu_model"), prov.get("cpu_simd"))
        here_cpu = (provenance.cpu_model(), provenance.cpu_simd())
        if cpu[1] is not None and cpu != here_cpu:
            return (
                f"recorded on {', '.join(cpu)}, here {', '.join(here_cpu)} (XLA:CPU compiles "
                "for the processor's vector extensions, which order the sums)"
            )
        return None
    machine = (rec.get("done") or {}).get("machine", "")
    if "CPU" not in machine or f"jax {here['jax']}" not in machine:
        return f"recorded on {machine or 'an unrecorded machine'}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}:{c[1]}:{c[2]}" for c in CASES])
def test_rerun_equals_its_record(case, tfds_dir, tmp_path):
    table_name, row, seed, args = case
    rec = _record(table_name, row, seed, args)
    reason = _comparable(rec)
    if reason:
        pytest.fail(f"the record is not comparable bit for bit here: {reason}; rerun it")
    _, table = spec.load(os.path.join(ROOT, "experiments", "tables", f"{table_name}.py"))
    workdir = str(tmp_path / "run")
    cfg = rec["config"] + (":" + ",".join(f"{k}={v}" for k, v in rec["args"].items()))
    argv = ["train", "--config", cfg.rstrip(":"), "--workdir", workdir, f"--config.seed={seed}"]
    argv += [f"--config.{k}={v}" for k, v in rec["overrides"].items()]
    cmd = [sys.executable, "-m", "xmodal_jax.main", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=_environment(rec), capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    keys = sorted(records.table_metrics(table) & set(rec["summary"]))
    assert keys
    for key in keys:
        assert summary[key] == pytest.approx(rec["summary"][key], abs=1e-6), key
    if table_name == "animals_zeroshot":  # the quick start's headline claim, not only its value
        unseen = summary["eval/zeroshot_unseen/accuracy"]
        assert unseen >= summary["eval/zeroshot_unseen_control/accuracy"] + 0.10


def test_a_record_of_another_processor_is_not_compared():
    here = {"versions": provenance.versions(), "platform": "cpu"}
    here |= {"device_count": jax.device_count(), "usable_cpus": provenance.usable_cpus()}
    cpu = {"cpu_model": provenance.cpu_model(), "cpu_simd": provenance.cpu_simd()}
    assert _comparable({"provenance": here}) is None  # before the fields: compared
    assert _comparable({"provenance": {**here, **cpu}}) is None
    other = {**here, **cpu, "cpu_simd": "AVX-512" if cpu["cpu_simd"] != "AVX-512" else "AVX2"}
    assert "vector extensions" in _comparable({"provenance": other})


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
