"""Every committed table is what its committed run records give (`make tables`), and every
table embedded in a document is that table, verbatim."""

import glob
import importlib.util
import json
import os

import pytest

from xmodal_jax.tables import cli, embed, jobs, records, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "tables", "results")
TABLES = sorted(
    os.path.basename(p)[: -len(".md")] for p in glob.glob(os.path.join(RESULTS, "*.md"))
)
TABLES = [t for t in TABLES if t != "README"]


def test_there_are_committed_tables():
    assert len(TABLES) >= 2


@pytest.mark.parametrize("name", TABLES)
def test_committed_table_equals_what_its_records_give(name):
    path = os.path.join(RESULTS, f"{name}.runs.jsonl")
    assert os.path.exists(path), f"{name}.md has no records ({name}.runs.jsonl)"
    recs = records.load(path)
    assert recs and all((r["summary"] and r["done"]) or r.get("diverged") for r in recs)
    _, table = spec.load(os.path.join(ROOT, "experiments", "tables", f"{name}.py"))
    texts = cli.table_texts(table, name, None, runs=records.RecordRuns(recs))
    assert ROOT not in texts["md"], f"{name}.md names this checkout's path"
    for ext, text in texts.items():
        with open(os.path.join(RESULTS, f"{name}.{ext}")) as f:
            assert f.read() == text, f"{name}.{ext} differs from its records: run make tables"


@pytest.mark.parametrize("name", TABLES)
def test_committed_records_are_runs_of_the_configs_as_they_stand(name, monkeypatch):
    """A config changed after its runs were recorded makes their figures stale: the records'
    `config_hash` must still be what the table's jobs give (rerun them, or withdraw them)."""
    monkeypatch.chdir(ROOT)
    _, table = spec.load(os.path.join("experiments", "tables", f"{name}.py"))
    recs = records.load(os.path.join(RESULTS, f"{name}.runs.jsonl"))
    assert all(r["provenance"] for r in recs), f"{name}: a record without provenance"
    _, dropped = records.current(recs, jobs.expand(table))
    assert not dropped, f"{name}: stale records: {dropped[:3]}"


@pytest.mark.parametrize("doc", embed.DOCUMENTS)
def test_embedded_tables_are_current(doc):
    path = os.path.join(ROOT, doc)
    with open(path) as f:
        text = f.read()
    assert embed.count(text) >= 1, f"{doc} is listed as embedding tables but has no marker"
    assert embed.embed(text, ROOT) == text, f"{doc} embeds a stale table: run make tables"


def _bench_tables():
    spec = importlib.util.spec_from_file_location(
        "bench_tables", os.path.join(ROOT, "benchmarks", "tables.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH_RUNS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))


@pytest.mark.parametrize("path", BENCH_RUNS, ids=os.path.basename)
def test_benchmark_tables_equal_what_their_runs_give(path):
    module = _bench_tables()
    with open(path) as f:
        want = module.tables(json.load(f))
    with open(module.markdown_path(path)) as f:
        assert f.read() == want, f"{path}: its .md is stale; run make tables"


def test_parity_record_is_within_the_bounds_its_tests_assert():
    """benchmarks/results/parity.json (`benchmarks/parity.py`): every measured output is within
    the bound its test asserts, and every test file it names exists."""
    with open(os.path.join(ROOT, "benchmarks", "results", "parity.json")) as f:
        record = json.load(f)
    assert record["kind"] == "parity" and len(record["rows"]) >= 20
    for row in record["rows"]:
        bound, kind = row["bound"].split()
        measured = row["max_abs_err"] if kind == "absolute" else row["max_rel_err"]
        assert kind in ("absolute", "relative") and 0 <= measured <= float(bound), row
        assert os.path.exists(os.path.join(ROOT, "tests", row["test"])), row
