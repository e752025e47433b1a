"""Paper tables: job keys, the resumable runner, model selection, collection and rendering."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import fake_gcs
import numpy as np
import pytest

from xmodal_jax import config as config_lib
from xmodal_jax.errors import Preempted, UserError
from xmodal_jax.tables import (
    Column,
    Reference,
    Row,
    Table,
    aggregate,
    cli,
    render,
    run_job,
    runner,
    select,
)
from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import records as records_lib
from xmodal_jax.tables import spec as spec_lib

# A stand-in for `xmodal train`: writes metrics.jsonl and summary.json from the seed and the
# config arguments, counts its invocations, and fails when the arguments say `fail=1`.
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys
    argv = sys.argv[1:]
    assert argv[0] == "train"
    spec = argv[argv.index("--config") + 1]
    wd = argv[argv.index("--workdir") + 1]
    seed = int([a for a in argv if a.startswith("--config.seed=")][0].split("=")[1])
    args = dict(kv.split("=") for kv in spec.partition(":")[2].split(",") if kv)
    with open(os.path.join(os.path.dirname(wd), "calls.txt"), "a") as f:
        f.write(wd + "\\n")
    print("training", spec, seed)
    if args.get("fail") == "1":
        sys.exit(5)
    if args.get("diverge") == "1":  # as `xmodal train` says it, and its exit code
        print("xmodal: training diverged: Non-finite training metrics at step 7: "
              "{'train/grad_norm': inf}. Stopped; the last good checkpoint (none) is kept.",
              file=sys.stderr)
        sys.exit(3)
    acc = float(args.get("base", "0.5")) + 0.01 * seed + float(os.environ.get("FAKE_BONUS", 0))
    if "source" in args:  # a run that reads another's result (a row's `needs`)
        with open(os.path.join(args["source"], "summary.json")) as f:
            acc += json.load(f)["eval/target/accuracy"]
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "train/loss": 1.0}) + "\\n")
        f.write(json.dumps({"step": 1, "eval/target/accuracy": acc + 0.1,
                            "eval/source/accuracy": 0.9}) + "\\n")
        f.write(json.dumps({"step": 2, "eval/target/accuracy": acc,
                            "eval/source/accuracy": 0.8}) + "\\n")
    with open(os.path.join(wd, "summary.json"), "w") as f:
        json.dump({"step": 2, "eval/target/accuracy": acc, "eval/source/accuracy": 0.8}, f)
    """
)


def _job(**kw) -> jobs_lib.Job:
    base = dict(row="r", config="experiments/x.py", args=(), seed=0, overrides=(), grid_point=())
    return jobs_lib.Job(**{**base, **kw})


def test_job_keys_are_stable_and_depend_only_on_the_run():
    a = _job(args=(("direction", "m2u"),), seed=1, overrides=(("lr", "0.1"),))
    # The key of a run must never change between versions: finished runs are found by it.
    assert a.key == "759ff39deb1dfcdb"
    assert a.key == _job(row="other label", args=(("direction", "m2u"),), seed=1,
                         overrides=(("lr", "0.1"),), config="experiments/./x.py").key  # fmt: skip
    others = [
        _job(args=(("direction", "m2u"),), seed=2, overrides=(("lr", "0.1"),)),
        _job(args=(("direction", "u2m"),), seed=1, overrides=(("lr", "0.1"),)),
        _job(args=(("direction", "m2u"),), seed=1, overrides=(("lr", "0.01"),)),
        _job(
            config="experiments/y.py",
            args=(("direction", "m2u"),),
            seed=1,
            overrides=(("lr", "0.1"),),
        ),  # fmt: skip
    ]
    assert len({a.key, *(o.key for o in others)}) == 5


def test_expand_orders_arguments_and_merges_column_arguments():
    t = Table(
        title="t",
        rows=[Row("a", "c.py", "width=1,b=2"), Row("b", "c.py", seeds=(7,))],
        columns=[Column("x", "m", args="direction=m2u"), Column("y", "m", args="direction=u2m")],
        seeds=(0, 1),
        grid={"lr": [0.1, 0.01]},
    )
    jobs = jobs_lib.expand(t)
    assert len(jobs) == 2 * 2 * 2 + 1 * 2 * 2  # rows x columns x grid x seeds
    first = jobs[0]
    assert first.spec == "c.py:b=2,direction=m2u,width=1"
    assert first.command("/w", ["prog"]) == [
        "prog", "train", "--config", "c.py:b=2,direction=m2u,width=1", "--workdir", "/w",
        "--config.seed=0", "--config.lr=0.1",
    ]  # fmt: skip
    assert {j.seed for j in jobs if j.row == "b"} == {7}
    # The same config arguments written in another order are the same job.
    swapped = Table(title="t", rows=[Row("z", "c.py", "b=2,width=1")], columns=t.columns[:1],
                    seeds=(0,), grid={"lr": [0.1]})  # fmt: skip
    assert jobs_lib.expand(swapped)[0].key == first.key


def test_seed_override_reaches_the_digits_configs():
    # The runner passes --config.seed=S; the digits configs also take `seed` as an argument, so
    # check that the override is what the trainer sees (config.seed seeds init and data order).
    config = config_lib.load("experiments/digits/dann.py:direction=u2m")
    assert config.seed == 0
    config_lib.apply_overrides(config, ["--config.seed=2"])
    assert config.seed == 2 and config.direction == "u2m"


TABLE_FILES = sorted(
    n.removesuffix(".py")
    for n in os.listdir("experiments/tables")
    if n.endswith(".py") and not n.startswith(("_", "plot_"))
)


def test_every_table_file_is_checked():
    assert {"digits_da", "corruptions", "zeroshot_shift", "office31"} <= set(TABLE_FILES)


@pytest.mark.parametrize("name", TABLE_FILES)
def test_table_files_load(name):
    table_name, table = spec_lib.load(f"experiments/tables/{name}.py")
    assert table_name == name
    jobs = jobs_lib.expand(table)
    seeds = {r.label: set(table.seeds_of(r)) for r in table.rows}
    assert jobs and all(j.seed in seeds[j.row] for j in jobs)


def test_digits_table_covers_every_config_both_directions_three_seeds():
    """Every digits config is a row; the grids' trade-offs are keys the configs define; SHOT
    adapts the source-only run of its own direction and seed."""
    _, table = spec_lib.load("experiments/tables/digits_da.py")
    jobs = jobs_lib.expand(table)
    configs = sorted(f for f in os.listdir("experiments/digits") if f.endswith(".py"))
    configs.remove("digits_common.py")
    configs.remove("__init__.py")
    own = [r for r in table.rows if not r.metrics]  # the BatchNorm source row reads adabn's
    assert sorted(os.path.basename(r.config) for r in own) == configs
    (bn,) = [r for r in table.rows if r.metrics]
    assert bn.config == "experiments/digits/adabn.py" and set(bn.metrics.values()) == {
        "eval/target_no_adabn/accuracy"
    }
    points = {r.label: len(jobs_lib.grid_points(dict(table.grid_of(r)))) for r in own}
    assert len(jobs) == sum(points.values()) * 2 * 3
    assert {(j.args, j.seed) for j in jobs if j.row == "dann"} == {
        ((("direction", d),), s) for d in ("m2u", "u2m") for s in (0, 1, 2)
    }
    jobs_lib.check_configs(jobs, "digits_da")  # every config exists
    for job in jobs:
        if job.grid_point or job.row == "entropy":
            config = config_lib.load(job.spec)
            config_lib.apply_overrides(config, job.config_overrides())  # the keys exist
    source = {(j.args, j.seed): j.key for j in jobs if j.row == "source_only"}
    shot = [j for j in jobs if j.row == "shot"]
    assert len(shot) == 6 and all(j.needs == (("source", source[j.args, j.seed]),) for j in shot)
    assert table.select_metric == "eval/source_val/accuracy"
    config = config_lib.load("experiments/digits/dann.py:direction=u2m")
    assert config.data.source.split == "train[:90%]" and config.data.target.split == "train"
    assert config.evals.source_val.split == "train[90%:]"
    assert {e.split for k, e in config.evals.items() if k.startswith("target")} == {"test"}


def test_digit_shift_table_runs_the_digits_rows_from_the_full_mnist():
    """The shift table has the digits table's rows and grids, with the full MNIST's own
    validation split choosing, and one channel count per run (MNIST made RGB beside a colour
    target)."""
    _, da = spec_lib.load("experiments/tables/digits_da.py")
    _, shift = spec_lib.load("experiments/tables/digits_shift.py")
    assert [(r.label, r.config, r.grid, r.needs) for r in shift.rows] == [
        (r.label, r.config, r.grid, r.needs) for r in da.rows
    ]
    assert len(jobs_lib.expand(shift)) == len(jobs_lib.expand(da)) // 2 * 3
    dann = {d: config_lib.load(f"experiments/digits/dann.py:direction={d}") for d in
            ("mf2u", "mf2mm", "mf2syn")}  # fmt: skip
    for direction, c in dann.items():
        assert (c.data.source.name, c.data.source.split) == ("digits_mnist", "train")
        assert (c.evals.source_val.dataset, c.evals.source_val.split) == (
            "digits_mnist",
            "validation",
        )
        rgb = direction != "mf2u"  # UCI is grey: MNIST stays grey beside it
        mnist = [c.data.source, c.evals.source_val, c.evals.source, c.evals.a_distance.source]
        target = [c.data.target, c.evals.target, c.evals.a_distance.target]
        assert all(("grey_to_rgb" in d.pp) == rgb for d in mnist)
        assert not any("grey_to_rgb" in d.pp for d in target)  # colour, or grey beside grey
    oracle = config_lib.load("experiments/digits/target_oracle.py:direction=mf2syn")
    assert oracle.data.name == "syn_digits_like" and "resize(28)" in oracle.data.pp


def test_missing_config_file_is_one_clear_error(tmp_path):
    path = tmp_path / "t.py"
    path.write_text(
        "from xmodal_jax.tables import Column, Row, Table\n"
        "TABLE = Table(title='t', rows=[Row('gone', 'experiments/animals/no_such.py')],"
        " columns=[Column('acc', 'eval/test/accuracy')])\n"
    )
    with pytest.raises(UserError, match=r"no_such\.py.*do not exist.*gone"):
        cli.run([str(path), "--root", str(tmp_path / "root"), "--dry-run"])


def test_bad_table_definitions_are_rejected():
    cols = [Column("x", "m")]
    with pytest.raises(UserError, match="appear twice"):
        spec_lib.check(Table("t", [Row("a", "c.py"), Row("a", "d.py")], cols))
    with pytest.raises(UserError, match="not column labels"):
        spec_lib.check(Table("t", [Row("a", "c.py", reference=Reference("s", {"z": 1.0}))], cols))
    with pytest.raises(UserError, match="select_metric"):
        spec_lib.select_rule(Table("t", [Row("a", "c.py")], cols), "source_val")
    with pytest.raises(UserError, match="seeds="):
        spec_lib.check(Table("t", [Row("a", "c.py")], cols, grid={"seed": [1, 2]}))


def test_selection_rules_on_a_metrics_history():
    rows = [
        {"step": 100, "train/loss": 2.0},
        {"step": 100, "eval/source/accuracy": 0.70, "eval/target/accuracy": 0.40},
        {"step": 200, "eval/source/accuracy": 0.90, "eval/target/accuracy": 0.55},
        {"step": 300, "eval/source/accuracy": 0.90, "eval/target/accuracy": 0.65},
        {"step": 400, "eval/source/accuracy": 0.85},
        {"step": 400, "eval/target/accuracy": 0.60, "eval/target/loss": 1.0},
    ]
    history = select.eval_history(rows)
    assert history[400] == {"eval/source/accuracy": 0.85, "eval/target/accuracy": 0.60,
                            "eval/target/loss": 1.0}  # fmt: skip
    summary = {"step": 400, "eval/source/accuracy": 0.85, "eval/target/accuracy": 0.60}
    metrics = [("eval/target/accuracy", True), ("eval/target/loss", False)]
    src = "eval/source/accuracy"
    last = select.selected("last", summary, history, metrics, src)
    assert last["eval/target/accuracy"] == (0.60, 0.85, 400)
    assert last["eval/target/loss"] == (None, 0.85, 400)  # not in summary: not reported
    # Best source accuracy 0.90 at steps 200 and 300: the earliest wins.
    val = select.selected("source_val", summary, history, metrics, src)
    assert val["eval/target/accuracy"] == (0.55, 0.90, 200)
    oracle = select.selected("oracle", summary, history, metrics, src)
    assert oracle["eval/target/accuracy"] == (0.65, 0.65, 300)
    assert oracle["eval/target/loss"] == (1.0, 1.0, 400)
    with pytest.raises(UserError, match="eval/val/accuracy"):
        select.selected("source_val", summary, history, metrics, "eval/val/accuracy")


def _finish(workdir: str, summary: dict, history: list[dict] | None = None) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history or [])
    open(os.path.join(workdir, jobs_lib.DONE), "w").close()


def _hand_table() -> Table:
    return Table(
        title="Hand table",
        rows=[
            Row("base", "a.py", reference=Reference("Paper [x], Table 2", {"A": (61.5, 0.4)})),
            Row("new", "b.py"),
            Row("oracle", "c.py", compete=False, columns=["A"]),
        ],
        columns=[
            Column("A", "eval/target/accuracy", args="d=a"),
            Column("B", "eval/target/accuracy", args="d=b"),
        ],  # fmt: skip
        seeds=(0, 1, 2),
    )


def test_collect_and_render_against_hand_computed_figures(tmp_path):
    table, root = _hand_table(), str(tmp_path)
    values = {  # (row, column) -> accuracy per seed; None: that run never finished
        ("base", "A"): [0.60, 0.62, 0.65],
        ("base", "B"): [0.30, 0.32, None],
        ("new", "A"): [0.70, 0.66, 0.71],
        ("new", "B"): [None, None, None],
        ("oracle", "A"): [0.97, 0.99, 0.98],
    }
    for (row_label, col_label), accs in values.items():
        row = next(r for r in table.rows if r.label == row_label)
        col = next(c for c in table.columns if c.label == col_label)
        for job, acc in zip(jobs_lib.row_jobs(table, row, col.args), accs, strict=True):
            if acc is not None:
                _finish(job.workdir(root, "hand"), {"step": 9, "eval/target/accuracy": acc})
    new_b0 = jobs_lib.row_jobs(table, table.rows[1], "d=b")[0].workdir(root, "hand")
    os.makedirs(new_b0)  # started, never finished (running, or killed)
    cells = aggregate.collect(table, "hand", root, "last")

    base_a = cells["base", "A"]
    assert base_a.n == 3 and base_a.mean == pytest.approx((0.60 + 0.62 + 0.65) / 3)
    assert base_a.std == pytest.approx(statistics.stdev([0.60, 0.62, 0.65]))
    assert cells["base", "B"].n == 2 and [s for s, _, _ in cells["base", "B"].missing] == [2]
    assert cells["new", "B"].n == 0 and len(cells["new", "B"].missing) == 3
    assert cells["oracle", "B"].expected == 0  # the row does not fill this column

    md = render.markdown(table, cells, "last", "last: the final evaluation")
    # 100 * mean and sample std, by hand: base A 62.33 ± 2.52; new A 69.00 ± 2.65;
    # base B 31.00 ± 1.41 from 2 of 3 seeds; oracle A 98.0 ± 1.0, excluded from bold.
    # base B is the best of its column (new B has no run): bold, and still marked 2 of 3.
    assert "| base | 62.3 ± 2.5 (3) | 61.5 ± 0.4 [1] | **31.0 ± 1.4** (2 of 3) |" in md
    assert "| new | **69.0 ± 2.6** (3) | — | missing (0 of 3) |" in md
    assert "| oracle † | 98.0 ± 1.0 (3) | — | n/a |" in md
    assert "[1] Paper [x], Table 2" in md
    assert "Model selection: last: the final evaluation." in md
    assert "Missing: 4." in md and md.count("not run") == 3
    assert f"- new, seed 0: unfinished [B] ({new_b0})" in md
    assert "- base, seed 2: not run [B] (" in md
    tex = render.latex(table, cells, "last", "last")
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf{69.0 $\pm$ 2.6}" in tex
    assert r"\textit{missing} (0 of 3)" in tex and r"oracle$^\dagger$" in tex
    rows = list(csv.DictReader(io.StringIO(render.csv_text(table, cells, "last"))))
    by = {(r["row"], r["column"]): r for r in rows}
    assert float(by["new", "A"]["mean"]) == pytest.approx(69.0)
    assert float(by["new", "A"]["std"]) == pytest.approx(100 * statistics.stdev([0.70, 0.66, 0.71]))
    assert by["new", "A"]["best"] == "1" and by["oracle", "A"]["best"] == "0"
    assert by["base", "B"]["missing_seeds"] == "2:not run" and by["base", "B"]["n"] == "2"
    assert by["new", "B"]["missing_seeds"] == "0:unfinished 1:not run 2:not run"
    assert by["base", "A"]["ref_mean"] == "61.5" and by["base", "A"]["ref_std"] == "0.4"


def test_grid_point_chosen_by_the_selection_metric(tmp_path):
    table = Table(
        title="g",
        rows=[Row("m", "a.py")],
        columns=[Column("T", "eval/target/accuracy")],
        seeds=(0, 1),
        grid={"lr": [0.1, 0.01]},
        select_metric="eval/source/accuracy",
    )
    src = {"0.1": 0.9, "0.01": 0.8}  # lr=0.1 wins on source, lr=0.01 on target
    tgt = {"0.1": 0.5, "0.01": 0.7}
    for job in jobs_lib.expand(table):
        lr = dict(job.grid_point)["lr"]
        summary = {"step": 5, "eval/source/accuracy": src[lr], "eval/target/accuracy": tgt[lr]}
        history = [{"step": 5, **summary}]
        _finish(job.workdir(str(tmp_path), "g"), summary, history)
    for rule, lr, value in (("last", "0.1", 0.5), ("source_val", "0.1", 0.5),
                            ("oracle", "0.01", 0.7)):  # fmt: skip
        cell = aggregate.collect(table, "g", str(tmp_path), rule)["m", "T"]
        assert cell.hparams == {"lr": lr} and cell.mean == pytest.approx(value)


def test_a_row_grid_replaces_the_table_grid_and_its_choice_is_shown(tmp_path):
    table = Table(
        title="g",
        rows=[Row("plain", "a.py"), Row("tuned", "b.py", grid={"adaptation.weight": [0.1, 1.0]})],
        columns=[Column("T", "eval/target/accuracy")],
        seeds=(0,),
        select_metric="eval/source_val/accuracy",
    )
    jobs = jobs_lib.expand(table)
    assert [(j.row, j.grid_point) for j in jobs] == [
        ("plain", ()),
        ("tuned", (("adaptation.weight", "0.1"),)),
        ("tuned", (("adaptation.weight", "1.0"),)),
    ]
    for done in (jobs[:2], jobs[2:]):
        for job in done:
            w = dict(job.grid_point).get("adaptation.weight", "none")
            val = {"none": 0.5, "0.1": 0.9, "1.0": 0.6}[w]  # 0.1 wins on validation ...
            tgt = {"none": 0.3, "0.1": 0.4, "1.0": 0.8}[w]  # ... 1.0 would win on target
            summary = {"step": 5, "eval/source_val/accuracy": val, "eval/target/accuracy": tgt}
            _finish(job.workdir(str(tmp_path), "g"), summary, [summary])
        if len(done) == 2:  # one grid point has not run: the choice says it is not final
            cells = aggregate.collect(table, "g", str(tmp_path), "last")
            md = render.markdown(table, cells, "last", "last")
            assert "| tuned | **40.0** (1) [weight=0.1; 1 of 2 points finished] |" in md
            assert "- tuned, seed 0: not run (" in md and "Missing: 1." in md
    cells = aggregate.collect(table, "g", str(tmp_path), "last")
    assert cells["tuned", "T"].hparams == {"adaptation.weight": "0.1"}
    assert cells["tuned", "T"].mean == pytest.approx(0.4)
    md = render.markdown(table, cells, "last", "last")
    assert "| tuned | **40.0** (1) [weight=0.1] |" in md and "| plain | 30.0 (1) |" in md
    with pytest.raises(UserError, match="select_metric"):
        spec_lib.select_rule(dataclasses.replace(table, select_metric=None), "last")
    with pytest.raises(UserError, match="overrides grid keys"):
        bad = Row("x", "a.py", overrides={"lr": 1}, grid={"lr": [1]})
        spec_lib.check(dataclasses.replace(table, rows=[bad]))


def _write_table(tmp_path, rows: str, more: str = "") -> str:
    for name in ("good.py", "bad.py"):
        (tmp_path / name).write_text("def get_config(arg=None):\n    raise NotImplementedError\n")
    path = tmp_path / "fake.py"
    path.write_text(
        "from xmodal_jax.tables import Column, Row, Table\n"
        f"GOOD, BAD = {str(tmp_path / 'good.py')!r}, {str(tmp_path / 'bad.py')!r}\n"
        f"TABLE = Table(title='Fake', rows=[{rows}],\n"
        "    columns=[Column('T', 'eval/target/accuracy')], seeds=(0, 1),\n"
        f"    select_metric='eval/source/accuracy'{more})\n"
    )
    return str(path)


def test_a_tables_env_reaches_its_runs_and_leaves_their_keys(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_BONUS", "0.3")  # the caller's value: the table's replaces it
    plain = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5')")
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5')", ", env={'FAKE_BONUS': '0.2'}")
    jobs = jobs_lib.expand(spec_lib.load(table)[1])
    assert [j.key for j in jobs] == [j.key for j in jobs_lib.expand(spec_lib.load(plain)[1])]
    assert jobs[0].command("/w")[:2] == ["env", "FAKE_BONUS=0.2"]
    assert jobs[0].describe()["env"] == {"FAKE_BONUS": "0.2"}
    root = str(tmp_path / "root")
    cli.run([table, "--root", root, "--seeds", "0"])  # through the runner
    (line,) = [x for x in cli.dry_run_lines(jobs, root, "fake") if x]  # seed 1, as a line
    assert subprocess.run(["bash", "-c", line], capture_output=True).returncode == 0
    cli.run([table, "--root", root, "--collect-only"])
    assert "| good | **70.5 ± 0.7** (2) |" in open(os.path.join(root, "fake.md")).read()
    for env, why in (({"A-B": "1"}, "variable names"), ({"A": 1}, "string values")):
        bad = _write_table(tmp_path, "Row('good', GOOD)", f", env={env!r}")
        with pytest.raises(UserError, match=why):
            spec_lib.load(bad)


def test_runner_resumes_skips_finished_jobs_and_reports_failures(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5'), Row('bad', BAD, 'fail=1')")
    root = str(tmp_path / "root")
    argv = [table, "--root", root, "--jobs", "2"]

    with pytest.raises(UserError, match="2 of 4 jobs failed"):
        cli.run(argv)
    calls = (tmp_path / "root" / "fake" / "calls.txt").read_text().split()
    assert len(calls) == 4
    _, t = spec_lib.load(table)
    by_row = {j.row: [] for j in jobs_lib.expand(t)}
    for j in jobs_lib.expand(t):
        by_row[j.row].append(j.workdir(root, "fake"))
    for wd in by_row["bad"]:
        assert jobs_lib.status(wd) == "failed"
        assert json.load(open(os.path.join(wd, "failed")))["rc"] == 5
        assert "training" in open(os.path.join(wd, "log.txt")).read()  # the log is kept
    assert all(jobs_lib.status(wd) == "done" for wd in by_row["good"])
    md = open(os.path.join(root, "fake.md")).read()
    assert "| good | **50.5 ± 0.7** (2) |" in md  # 0.50 and 0.51
    assert "| bad | missing (0 of 2) |" in md and "bad, seed 0: failed (" in md

    # Rerun: the finished jobs are skipped, only the failed ones start again.
    with pytest.raises(UserError, match="2 of 4 jobs failed"):
        cli.run(argv)
    calls = (tmp_path / "root" / "fake" / "calls.txt").read_text().split()
    assert len(calls) == 6 and set(calls[4:]) == set(by_row["bad"])
    assert "2 of 4 jobs already done" in capsys.readouterr().out

    # Without the failing row everything is done: nothing runs and the exit is clean.
    result = cli.run([*argv, "--only", "^good$", "--select", "oracle"])
    assert result["skipped"] == 2 and result["done"] == 0
    assert len((tmp_path / "root" / "fake" / "calls.txt").read_text().split()) == 6
    md = open(os.path.join(root, "fake.md")).read()
    assert md.startswith("# Fake (oracle selection)")
    assert "| good | **60.5 ± 0.7** (2) |" in md  # the best target step (step 1) per seed

    # The records written beside the table give the same table with no root at all, under
    # every selection rule (they keep the eval history the rules read). Without the failed row:
    # a missing run's line names its workdir, which only the root has.
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5')")
    records = [json.loads(line) for line in open(os.path.join(root, "fake.runs.jsonl"))]
    assert sorted((r["row"], r["seed"]) for r in records) == [("good", 0), ("good", 1)]
    assert all(r["done"]["rc"] == 0 and r["summary"]["step"] for r in records)
    for rule in ("oracle", "last", "source_val"):
        cli.run([table, "--root", root, "--select", rule])
        out = tmp_path / f"from_records_{rule}"
        cli.run([table, "--records", os.path.join(root, "fake.runs.jsonl"), "--out", str(out),
                 "--select", rule])  # fmt: skip
        for ext in ("md", "tex", "csv"):
            written = open(os.path.join(root, f"fake.{ext}")).read()
            assert (out / f"fake.{ext}").read_text() == written
    with pytest.raises(UserError, match="--records without --root writes a table from its"):
        cli.run([table, "--records", os.path.join(root, "fake.runs.jsonl"), "--only", "good"])


def test_only_runs_what_the_chosen_rows_read(tmp_path, monkeypatch):
    """A row that reports another row's runs under another metric has no jobs of its own;
    choosing it with `--only` runs those runs (not an error that it matches nothing)."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table = _write_table(
        tmp_path,
        "Row('good', GOOD, 'base=0.5'), Row('bad', BAD, 'fail=1'), "
        "Row('good, source', GOOD, 'base=0.5', metrics={'T': 'eval/source/accuracy'})",
    )
    root = str(tmp_path / "root")
    result = cli.run([table, "--root", root, "--only", "source"])
    assert result["done"] == 2
    calls = (tmp_path / "root" / "fake" / "calls.txt").read_text().split()
    _, t = spec_lib.load(table)
    good = sorted(j.workdir(root, "fake") for j in jobs_lib.expand(t) if j.row == "good")
    assert sorted(calls) == good
    with pytest.raises(UserError, match="matches no row label"):
        cli.run([table, "--root", root, "--only", "nothing"])


def test_a_diverged_run_is_a_result_reported_and_not_retried(tmp_path, monkeypatch, capsys):
    """A run whose training diverges (exit 3) is an outcome of its seed: the table lists it as
    diverged, with what the trainer said, instead of 'not run'; its record says so too; the
    command does not fail and no later command runs it again."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5'), Row('wild', BAD, 'diverge=1')")
    root, recs = str(tmp_path / "root"), str(tmp_path / "results" / "fake.runs.jsonl")
    argv = [table, "--root", root, "--records", recs]
    result = cli.run(argv)
    assert (result["done"], result["diverged"], result["failed"]) == (2, 2, 0)
    said = "Non-finite training metrics at step 7: {'train/grad_norm': inf}"
    assert f"diverged ({said}; reported as such, not retried): wild seed=0" in (
        capsys.readouterr().out
    )
    _, t = spec_lib.load(table)
    wild = [j.workdir(root, "fake") for j in jobs_lib.expand(t) if j.row == "wild"]
    assert [jobs_lib.status(wd) for wd in wild] == ["diverged", "diverged"]
    assert json.load(open(os.path.join(wild[0], "diverged")))["said"] == said

    def line_of(md: str, seed: int) -> str:
        return next(x for x in md.splitlines() if x.startswith(f"- wild, seed {seed}:"))

    md = (tmp_path / "results" / "fake.md").read_text()
    assert "| wild | missing (0 of 2) |" in md
    assert line_of(md, 1).startswith(f"- wild, seed 1: diverged ({said})")
    assert "4 runs (2 diverged), " in md
    records = records_lib.load(recs)
    assert sorted((r["row"], bool(r.get("diverged"))) for r in records) == [
        ("good", False), ("good", False), ("wild", True), ("wild", True)
    ]  # fmt: skip

    # Not run again, from the same root or from the records in a new one.
    calls = lambda root: (tmp_path / root / "fake" / "calls.txt").read_text().split()
    assert cli.run(argv)["diverged"] == 0 and len(calls("root")) == 4
    assert "4 of 4 jobs are recorded in" in capsys.readouterr().out
    assert cli.run([table, "--root", root])["skipped"] == 4 and len(calls("root")) == 4
    assert "4 of 4 jobs already done (skipped), 2 of them diverged" in capsys.readouterr().out
    assert cli.run([table, "--root", str(tmp_path / "r2"), "--records", recs])["done"] == 0
    assert not os.path.exists(tmp_path / "r2" / "fake" / "calls.txt")
    # The table written from the records alone says the same.
    cli.run([table, "--records", recs, "--out", str(tmp_path / "again")])
    again = (tmp_path / "again" / "fake.md").read_text()
    assert line_of(again, 0) == line_of(md, 0)


SIGNALLED_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    argv = sys.argv[1:]
    wd = argv[argv.index("--workdir") + 1]
    finish = "finish=1" in argv[argv.index("--config") + 1]

    def stop(signum, frame):
        if finish:  # past its last step: the run ends, its summary written
            with open(os.path.join(wd, "summary.json"), "w") as f:
                json.dump({"step": 2, "eval/target/accuracy": 0.5}, f)
            sys.exit(0)
        sys.exit(75)  # saved a checkpoint: the run resumes next time

    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(wd, "started"), "w").close()
    time.sleep(60)
    sys.exit(3)
    """
)


def test_a_job_that_ends_its_run_while_the_table_stops_is_marked_done(tmp_path, monkeypatch):
    script = tmp_path / "signalled_trainer.py"
    script.write_text(SIGNALLED_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    jobs = [_job(row="ends", args=(("finish", "1"),)), _job(row="saves")]
    workdirs = [str(tmp_path / j.row) for j in jobs]
    for wd in workdirs:
        os.makedirs(wd)

    def stop_when_both_run():
        while not all(os.path.exists(os.path.join(wd, "started")) for wd in workdirs):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_both_run, daemon=True).start()
    lines, merged = [], []
    with pytest.raises(Preempted, match="1 running job\\(s\\) saved, 1 finished and 0 not"):
        runner.run(jobs, workdirs, parallel=2, report=lines.append, on_done=merged.append)
    assert merged == [workdirs[0]]  # its record is written, as for any finished job
    assert jobs_lib.status(workdirs[0]) == "done"
    assert jobs_lib.status(workdirs[1]) != "done"  # unfinished: resumed by the next command
    assert not os.path.exists(os.path.join(workdirs[1], jobs_lib.FAILED))
    assert "done while stopping: ends seed=0" in lines


def test_dry_run_prints_commands_of_unfinished_jobs(tmp_path, capsys):
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5')")
    root = str(tmp_path / "root")
    result = cli.run([table, "--root", root, "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert result == {"jobs": 2, "to_run": 2} and len(lines) == 2
    _, t = spec_lib.load(table)
    jobs = jobs_lib.expand(t)
    for job, line in zip(jobs, lines, strict=True):
        wd = job.workdir(root, "fake")
        run_job = shlex.join([sys.executable, "-m", "xmodal_jax.tables.run_job", wd, "--"])
        assert line.startswith(run_job + " ") and line.endswith(f"--config.seed={job.seed}")
        assert (
            f"-m xmodal_jax.main train --config {tmp_path}/good.py:base=0.5 --workdir {wd}" in line
        )
    assert not os.path.exists(os.path.join(root, "fake"))  # nothing ran, nothing was created
    _finish(jobs[0].workdir(root, "fake"), {"step": 1})
    cli.run([table, "--root", root, "--dry-run"])
    assert capsys.readouterr().out.strip().splitlines() == lines[1:]


def test_a_gs_root_prints_cluster_commands_and_collects_their_runs(tmp_path, monkeypatch, capsys):
    buckets, cwd = tmp_path / "buckets", tmp_path / "cwd"
    buckets.mkdir(), cwd.mkdir()
    fake_gcs.route_gs(monkeypatch, buckets)
    monkeypatch.chdir(cwd)  # a local file call on a gs:// path would leave `gs:` here
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5')")
    root = "gs://bucket/tables"
    with pytest.raises(UserError, match="need a local root"):
        cli.run([table, "--root", root])

    cli.run([table, "--root", root, "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    _, t = spec_lib.load(table)
    jobs = jobs_lib.expand(t)
    assert len(lines) == 2
    for job, line in zip(jobs, lines, strict=True):
        assert f"--workdir {root}/fake/{job.key} " in line
    # The cluster runs seed 0's line: the trainer writes into the bucket (here a stand-in that
    # writes the bucket's local copy), then `run_job` writes the marker there.
    wd, local_wd = (
        f"{root}/fake/{jobs[0].key}",
        buckets / "bucket" / "tables" / "fake" / jobs[0].key,
    )
    argv = shlex.split(lines[0])
    assert argv[:5] == [sys.executable, "-m", "xmodal_jax.tables.run_job", wd, "--"]
    summary = {"step": 2, "eval/target/accuracy": 0.5}
    stand_in = (f"import json, os; os.makedirs({str(local_wd)!r}); json.dump({summary!r}, "
                f"open({str(local_wd / 'summary.json')!r}, 'w')); print('trained')")  # fmt: skip
    assert run_job.main([wd, "--", sys.executable, "-c", stand_in]) == 0
    assert "trained" in capsys.readouterr().out
    assert json.loads((local_wd / jobs_lib.DONE).read_text())["rc"] == 0
    assert jobs_lib.status(wd) == "done" and not (local_wd / jobs_lib.LOG).exists()

    cli.run([table, "--root", root, "--dry-run"])
    assert capsys.readouterr().out.strip().splitlines() == lines[1:]
    result = cli.run([table, "--root", root, "--collect-only"])
    assert result["paths"][0] == f"{root}/fake.md"
    md = (buckets / "bucket" / "tables" / "fake.md").read_text()
    assert "| good | **50.0** (1 of 2) |" in md and "good, seed 1: not run" in md
    fake_gcs.clear_caches()
    assert not os.listdir(cwd)


def test_no_bold_in_a_control_column():
    table = Table(
        title="c",
        rows=[Row("a", "a.py"), Row("b", "b.py")],
        columns=[Column("T", "m"), Column("control", "m2", bold=False)],
    )
    cells = {
        (r, c): aggregate.Cell(expected=1, values=[v], seeds=[0])
        for (r, c), v in {
            ("a", "T"): 0.5,
            ("b", "T"): 0.7,
            ("a", "control"): 0.4,
            ("b", "control"): 0.3,
        }.items()  # fmt: skip
    }
    assert render.best_rows(table, cells) == {("b", "T")}


def test_a_column_with_its_own_scale_and_direction_beside_percentages():
    """A proxy A-distance (x1, 2 digits, lower is better) beside an accuracy (x100): each is
    shown, compared with the baseline and written to the CSV in its own units; the deltas and
    their standard errors checked against the formula in float64."""
    acc, adist = Column("acc", "m"), Column("A-dist.", "a", scale=1, digits=2,
                                            higher_is_better=False, bold=False)  # fmt: skip
    table = Table(title="s", rows=[Row("src", "a.py"), Row("dann", "b.py")],
                  columns=[acc, adist], seeds=(0, 1), baseline="src")  # fmt: skip
    values = {("src", "acc"): [0.5, 0.6], ("dann", "acc"): [0.7, 0.8],
              ("src", "A-dist."): [1.90, 1.94], ("dann", "A-dist."): [1.70, 1.76]}  # fmt: skip
    cells = {k: aggregate.Cell(expected=2, values=v, seeds=[0, 1]) for k, v in values.items()}
    se = lambda a, b: np.sqrt(np.var(a, ddof=1) / 2 + np.var(b, ddof=1) / 2)  # noqa: E731
    se_acc = se(values["dann", "acc"], values["src", "acc"])
    se_ad = se(values["dann", "A-dist."], values["src", "A-dist."])
    md = render.markdown(table, cells, "last", "last")
    assert (
        f"| dann | **75.0 ± 7.1** (2), Δ +20.0 ± {100 * se_acc:.1f} ↑ "
        f"| 1.73 ± 0.04 (2), Δ -0.19 ± {se_ad:.2f} ↑ |"
    ) in md
    assert "| src | 55.0 ± 7.1 (2) | 1.92 ± 0.03 (2) |" in md
    assert "A-dist. = a (x1, not x100; lower is better: ↑ marks a lower value)" in md
    assert "- A-dist.: ↑ dann." in md
    assert render.best_rows(table, cells) == {("dann", "acc")}
    rows = list(csv.DictReader(io.StringIO(render.csv_text(table, cells, "last"))))
    by = {(r["row"], r["column"]): r for r in rows}
    assert float(by["dann", "A-dist."]["mean"]) == pytest.approx(1.73)
    assert float(by["dann", "A-dist."]["delta"]) == pytest.approx(-0.19)
    assert float(by["dann", "A-dist."]["delta_se"]) == pytest.approx(se_ad, abs=1e-6)
    assert float(by["dann", "acc"]["delta_se"]) == pytest.approx(100 * se_acc, abs=1e-6)
    assert by["dann", "A-dist."]["better_than_baseline"] == "1"
    with pytest.raises(UserError, match="use a scale > 0"):
        spec_lib.check(Table("s", [Row("x", "a.py")], [Column("a", "m", scale=0)]))


def test_a_row_can_report_a_column_under_its_own_key(tmp_path):
    col = Column("split 0", "eval/zs/split_0/accuracy")
    table = Table(
        title="k",
        rows=[Row("many", "a.py"), Row("one", "b.py", metrics={"split 0": "eval/zs/accuracy"})],
        columns=[col],
    )
    summaries = {"many": {"eval/zs/split_0/accuracy": 0.4, "eval/zs/accuracy": 0.5},
                 "one": {"eval/zs/accuracy": 0.6}}  # fmt: skip
    for row in table.rows:
        job = jobs_lib.row_jobs(table, row, "")[0]
        _finish(job.workdir(str(tmp_path), "k"), {"step": 1, **summaries[row.label]})
    cells = aggregate.collect(table, "k", str(tmp_path), "last")
    assert cells["many", "split 0"].values == [0.4] and cells["one", "split 0"].values == [0.6]
    md = render.markdown(table, cells, "last", "last")
    assert "Row one: split 0 = eval/zs/accuracy." in md
    with pytest.raises(UserError, match="maps unknown columns"):
        spec_lib.check(Table("k", [Row("x", "a.py", metrics={"nope": "m"})], [col]))


def test_a_row_averaged_over_argument_sets(tmp_path):
    """A seed's value is the mean over its runs split=0..2; the split-0 column reads one run; a
    seed with one run missing is missing, not averaged over the others."""
    splits = ("split=0", "split=1", "split=2")
    table = Table(
        title="a",
        rows=[
            Row(
                "per split",
                "a.py",
                average_over=splits,
                column_args={"s0": "split=0", "s01": ("split=0", "split=1")},
            )
        ],
        columns=[Column(k, "eval/zs/accuracy") for k in ("all", "s0", "s01")],
        seeds=(0, 1, 2),
    )
    jobs = jobs_lib.expand(table)
    assert len(jobs) == 9 and {j.args for j in jobs} == {(("split", str(k)),) for k in range(3)}
    acc = {(0, "0"): 0.2, (0, "1"): 0.5, (0, "2"): 0.8, (1, "0"): 0.3, (1, "1"): 0.3}
    acc[1, "2"] = 0.6
    for job in jobs:
        key = (job.seed, dict(job.args)["split"])
        if key in acc:  # seed 2 has no finished run but split 0's
            _finish(job.workdir(str(tmp_path), "a"), {"step": 1, "eval/zs/accuracy": acc[key]})
        elif dict(job.args)["split"] == "0":
            _finish(job.workdir(str(tmp_path), "a"), {"step": 1, "eval/zs/accuracy": 0.9})
    cells = aggregate.collect(table, "a", str(tmp_path), "last")
    every, first = cells["per split", "all"], cells["per split", "s0"]
    assert every.seeds == [0, 1] and every.values == pytest.approx([0.5, 0.4])
    assert every.expected == 3 and [(s, st) for s, st, _ in every.missing] == [
        (2, "not run"),
        (2, "not run"),
    ]
    assert first.seeds == [0, 1, 2] and first.values == pytest.approx([0.2, 0.3, 0.9])
    two = cells["per split", "s01"]  # seed 2's split 1 is missing
    assert two.seeds == [0, 1] and two.values == pytest.approx([0.35, 0.3])
    md = render.markdown(table, cells, "last", "last")
    assert (
        "mean over the runs split=0, split=1, split=2 (s0 reads split=0 only; s01: split=0, "
        "split=1)" in md
    )
    assert (
        "| per split | **45.0 ± 7.1** (2 of 3) | **46.7 ± 37.9** (3) | **32.5 ± 3.5** (2 of 3) |"
        in md
    )
    with pytest.raises(UserError, match="not among its average_over"):
        spec_lib.check(
            dataclasses.replace(table, rows=[Row("x", "a.py", column_args={"s0": "k=1"})])
        )
    with pytest.raises(UserError, match="both set"):
        spec_lib.check(
            dataclasses.replace(table, rows=[Row("x", "a.py", "split=1", average_over=splits)])
        )


def test_seeds_option_runs_only_those_seeds(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5')")
    root = str(tmp_path / "root")
    result = cli.run([table, "--root", root, "--seeds", "1"])
    assert result["done"] == 1
    md = open(os.path.join(root, "fake.md")).read()
    assert "| good | **51.0** (1 of 2) |" in md and "good, seed 0: not run" in md
    with pytest.raises(UserError, match="matches none of the table's seeds"):
        cli.run([table, "--root", root, "--seeds", "7"])
    with pytest.raises(UserError, match="give integers"):
        cli.run([table, "--root", root, "--seeds", "one"])


def test_a_job_locked_by_another_command_is_not_run_twice(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table = _write_table(tmp_path, "Row('good', GOOD, 'base=0.5')")
    root = str(tmp_path / "root")
    _, t = spec_lib.load(table)
    busy, free = (j.workdir(root, "fake") for j in jobs_lib.expand(t))
    calls = tmp_path / "root" / "fake" / "calls.txt"
    # Another table command holds seed 0's lock (in another process: flock is per open file).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, os.path.join(busy, jobs_lib.LOCK)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    try:
        result = cli.run([table, "--root", root, "--jobs", "2"])
        assert result["busy"] == 1 and result["done"] == 1
        assert calls.read_text().split() == [free]
        assert "busy (another process runs it)" in capsys.readouterr().out
        assert jobs_lib.status(busy) == "running"
        md = open(os.path.join(root, "fake.md")).read()
        assert "good, seed 0: running (" in md
    finally:
        holder.kill()
        holder.wait()
    assert jobs_lib.status(busy) == "unfinished"
    result = cli.run([table, "--root", root])  # the lock is gone: now it runs
    assert result["done"] == 1 and calls.read_text().split() == [free, busy]


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_column_averages_several_metrics_and_csv_only_columns_stay_out_of_the_tables(
    tmp_path,
):
    """Severity 3 = mean of two corruptions' accuracies per run, then mean ± std over seeds; a
    run lacking one of them reports nothing; the per-corruption columns are in the CSV only."""
    keys = ("eval/fog_3/accuracy", "eval/snow_3/accuracy")
    adabn = ("eval/adabn_fog_3/accuracy", "eval/adabn_snow_3/accuracy")
    table = Table(
        title="c",
        rows=[Row("source", "a.py"), Row("adabn", "a.py", metrics={"sev 3": adabn})],
        columns=[
            Column("sev 3", keys),
            *(Column(k.split("/")[1], k, csv_only=True) for k in keys),
        ],
        seeds=(0, 1),
    )
    runs = {
        0: {"eval/fog_3/accuracy": 0.2, "eval/snow_3/accuracy": 0.6,
            "eval/adabn_fog_3/accuracy": 0.5, "eval/adabn_snow_3/accuracy": 0.7},
        1: {"eval/fog_3/accuracy": 0.4, "eval/snow_3/accuracy": 0.6,
            "eval/adabn_fog_3/accuracy": 0.9},  # adabn's snow evaluation is missing
    }  # fmt: skip
    jobs = jobs_lib.expand(table)
    assert len(jobs) == 2  # both rows read the same runs (same config, no arguments)
    for job in jobs:
        _finish(job.workdir(str(tmp_path), "c"), {"step": 1, **runs[job.seed]})
    cells = aggregate.collect(table, "c", str(tmp_path), "last")
    assert cells["source", "sev 3"].values == pytest.approx([0.4, 0.5])
    assert cells["adabn", "sev 3"].values == pytest.approx([0.6])
    assert cells["adabn", "sev 3"].not_reported == [1]
    assert cells["source", "fog_3"].values == pytest.approx([0.2, 0.4])
    md = render.markdown(table, cells, "last", "last")
    assert "| | sev 3 |" in md and "fog_3 |" not in md
    assert "| source | 45.0 ± 7.1 (2) |" in md and "| adabn | **60.0** (1 of 2) |" in md
    assert "sev 3 = mean of 2 (eval/fog_3/accuracy, eval/snow_3/accuracy)" in md
    assert "The CSV also has 2 columns: fog_3, snow_3." in md
    assert "fog" not in render.latex(table, cells, "last", "last").split("tabular")[1]
    csv_rows = list(csv.DictReader(io.StringIO(render.csv_text(table, cells, "last"))))
    assert [(r["row"], r["column"]) for r in csv_rows] == [
        (row, col) for row in ("source", "adabn") for col in ("sev 3", "fog_3", "snow_3")
    ]
    assert csv_rows[0]["metric"] == " ".join(keys) and csv_rows[1]["mean"] == "30.0"
    assert records_lib.table_metrics(table) >= {*keys, "eval/adabn_snow_3/accuracy"}
    with pytest.raises(UserError, match="every column is csv_only"):
        spec_lib.check(Table("c", [Row("x", "a.py")], [Column("a", "m", csv_only=True)]))


def test_a_row_that_needs_another_runs_after_it_and_reads_its_workdir(tmp_path, monkeypatch):
    """`needs={'source': 'src'}`: each seed's run gets the workdir of the `src` run of the same
    seed (the fake trainer adds that run's accuracy to its own), starts only once that one is
    done (even with --jobs 2), and is blocked when it failed."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    rows = "Row('src', GOOD, 'base=0.5'), Row('adapt', GOOD, 'base=0.1', needs={'source': 'src'})"
    table, root = _write_table(tmp_path, rows), str(tmp_path / "root")
    _, t = spec_lib.load(table)
    jobs = jobs_lib.expand(t)
    assert [j.row for j in jobs] == ["src", "src", "adapt", "adapt"]
    src = {j.seed: j for j in jobs if j.row == "src"}
    for job in jobs[2:]:
        assert job.needs == (("source", src[job.seed].key),)
        assert job.key != dataclasses.replace(job, needs=()).key
        cmd = job.command(job.workdir(root, "fake"))
        assert f"base=0.1,source={src[job.seed].workdir(root, 'fake')}" in " ".join(cmd)
    lines = cli.dry_run_lines(jobs, root, "fake")
    assert len(lines) == 5 and lines[2].startswith("# The lines below read runs above")
    assert cli.run([table, "--root", root, "--dry-run"])["to_run"] == 4  # not the comment

    cli.run([table, "--root", root, "--jobs", "2"])
    calls = (tmp_path / "root" / "fake" / "calls.txt").read_text().split()
    assert set(calls[:2]) == {src[0].workdir(root, "fake"), src[1].workdir(root, "fake")}
    md = open(os.path.join(root, "fake.md")).read()
    assert "| adapt | **61.0 ± 1.4** (2) |" in md  # (0.1 + 0.01 s) + (0.5 + 0.01 s), s = 0, 1

    rows = "Row('src', BAD, 'fail=1'), Row('adapt', GOOD, needs={'source': 'src'})"
    table = _write_table(tmp_path, rows)
    with pytest.raises(UserError, match="2 of 4 jobs failed .* 2 jobs that need them did not"):
        cli.run([table, "--root", root])
    with pytest.raises(UserError, match="2 of 2 jobs did not start: a run they need"):
        cli.run([table, "--root", root, "--only", "adapt"])
    for bad, why in (
        ({"source": "nope"}, "not another row"),
        ({"base": "src"}, "also set in the row's arguments"),
    ):
        with pytest.raises(UserError, match=why):
            spec_lib.check(
                dataclasses.replace(t, rows=[t.rows[0], dataclasses.replace(t.rows[1], needs=bad)])
            )


def test_a_row_with_many_unfinished_runs_is_one_line(tmp_path):
    sets = tuple(f"k={i}" for i in range(render.MAX_LISTED + 2))
    table = Table("m", [Row("big", "a.py", average_over=sets), Row("one", "b.py")],
                  [Column("A", "eval/a/accuracy")])  # fmt: skip
    jobs = jobs_lib.expand(table)
    _finish(jobs[0].workdir(str(tmp_path), "m"), {"step": 1, "eval/a/accuracy": 0.5})
    md = render.markdown(table, aggregate.collect(table, "m", str(tmp_path), "last"), "last", "")
    n = len(sets) - 1
    assert f"Missing: {n + 1}." in md  # the big row's unfinished runs and the other row's one
    assert f"- big: {n} runs not finished ({n} not run); --dry-run lists them" in md
    assert "- one, seed 0: not run (" in md

    # The compute left, at each row's median wall time a run: 7 x 120 s; a row without a timed
    # run is named, not counted; a diverged run is never run again, so it needs none.
    recs = [{"row": "big", "done": {"wall_s": w}} for w in (100.0, 150.0)]
    recs += [{"row": "big", "diverged": {"wall_s": 120.0}}, {"row": "one", "done": {}}]
    walls = records_lib.median_walls(recs)
    assert walls == {"big": 120.0}
    cells = aggregate.collect(table, "m", str(tmp_path), "last")
    md = render.markdown(table, cells, "last", "", walls=walls)
    assert f"Missing: {n + 1}; about 14 min of compute for the runs left, at their rows' " in md
    assert "(one: no timed run yet, not counted)." in md
    assert "lists them; about 14 min at the row's median 120 s a run" in md
    one = jobs_lib.row_jobs(table, table.rows[1], "")[0].workdir(str(tmp_path), "m")
    os.makedirs(one)
    with open(os.path.join(one, jobs_lib.DIVERGED), "w") as f:
        json.dump({"rc": 3, "said": "inf"}, f)
    cells = aggregate.collect(table, "m", str(tmp_path), "last")
    md = render.markdown(table, cells, "last", "", walls={**walls, "one": 600.0})
    assert "- one, seed 0: diverged (inf) (" in md
    assert "about 14 min of compute for the runs left" in md and "no timed run" not in md


# A trainer that records the config hash as `xmodal train` does (load, overrides, hash).
HASHING_TRAINER = FAKE_TRAINER + textwrap.dedent(
    """
    from xmodal_jax import config as config_lib, provenance
    config = config_lib.load(spec)
    config_lib.apply_overrides(config, argv[argv.index("--workdir") + 2:])
    with open(os.path.join(wd, "provenance.json"), "w") as f:
        json.dump({"config_hash": provenance.config_hash(config.to_dict()), "argv": sys.argv}, f)
    """
)


REQUIRED = dict.fromkeys(config_lib.REQUIRED_KEYS, 1)


def test_committed_records_resume_a_table_in_a_new_root(tmp_path, monkeypatch, capsys):
    """`--records FILE --root DIR`: recorded runs are not run again in an empty root, new runs
    are added to FILE, and a record whose config file changed since is dropped and rerun."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(HASHING_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table = _write_table(tmp_path, "Row('a', GOOD, 'base=0.5'), Row('b', BAD, 'base=0.2')")
    for name, lr in (("good.py", 0.1), ("bad.py", 0.1)):
        (tmp_path / name).write_text(
            "import ml_collections\n"
            "def get_config(arg=None):\n"
            f"    return ml_collections.ConfigDict({{**{REQUIRED!r}, 'lr': {lr}}})\n"
        )
    recs, out = str(tmp_path / "results" / "fake.runs.jsonl"), tmp_path / "results"
    calls = lambda root: (tmp_path / root / "fake" / "calls.txt").read_text().split()  # noqa: E731

    # Each finished run reaches the file as it finishes, not when the command ends.
    seen, run = [], runner.run

    def run_and_watch(*args, on_done, **kw):
        def watch(wd):
            on_done(wd)
            seen.append(len(records_lib.load(recs)))

        return run(*args, on_done=watch, **kw)

    monkeypatch.setattr(runner, "run", run_and_watch)
    cli.run([table, "--root", str(tmp_path / "r1"), "--records", recs, "--only", "^a$"])
    assert len(calls("r1")) == 2 and seen == [1, 2]
    monkeypatch.setattr(runner, "run", run)
    assert [r["row"] for r in records_lib.load(recs)] == ["a", "a"]
    assert "| a | **50.5 ± 0.7** (2) |" in (out / "fake.md").read_text()

    # A new root (another machine, a later day): only row b runs; the file gains its runs.
    capsys.readouterr()
    result = cli.run([table, "--root", str(tmp_path / "r2"), "--records", recs])
    assert "2 of 4 jobs are recorded in" in capsys.readouterr().out
    assert result["done"] == 2 and len(calls("r2")) == 2
    assert [r["row"] for r in records_lib.load(recs)] == ["a", "a", "b", "b"]
    _, t = spec_lib.load(table)
    by_key = {j.key: j for j in jobs_lib.expand(t)}
    for rec in records_lib.load(recs):  # the hash the job computes is the trainer's
        assert rec["provenance"]["config_hash"] == by_key[rec["key"]].config_hash()
    md = (out / "fake.md").read_text()
    assert "| a | **50.5 ± 0.7** (2) |" in md and "| b | 20.5 ± 0.7 (2) |" in md
    assert cli.run([table, "--root", str(tmp_path / "r3"), "--records", recs])["done"] == 0

    # b's config changes: its records are dropped (not shown) and its runs made again.
    (tmp_path / "bad.py").write_text((tmp_path / "bad.py").read_text().replace("0.1", "0.2"))
    capsys.readouterr()
    cli.run([table, "--root", str(tmp_path / "r4"), "--records", recs, "--dry-run"])
    printed = capsys.readouterr()
    assert printed.out.count("its config changed since the run") == 2
    assert printed.out.count("train --config") == 2 and "bad.py" in printed.out
    assert cli.run([table, "--root", str(tmp_path / "r4"), "--records", recs])["done"] == 2
    assert len(records_lib.load(recs)) == 4
    assert cli.run([table, "--root", str(tmp_path / "r5"), "--records", recs])["done"] == 0


def test_runs_another_command_adds_meanwhile_stay_in_the_records_file(tmp_path, monkeypatch):
    """Two commands add runs to one records file (here row b's, from another root, merged by
    `--collect-only` while row a runs): each merge reads the file as it is then, under a lock,
    so neither drops the other's runs."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(HASHING_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    table = _write_table(tmp_path, "Row('a', GOOD, 'base=0.5'), Row('b', GOOD, 'base=0.2')")
    (tmp_path / "good.py").write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({REQUIRED!r})\n"
    )
    recs, root_a, root_b = str(tmp_path / "fake.runs.jsonl"), tmp_path / "ra", tmp_path / "rb"
    assert cli.run([table, "--root", str(root_b), "--only", "^b$"])["done"] == 2
    run = runner.run

    def run_with_a_merge_meanwhile(*args, on_done, **kw):
        def merge_b_then_done(wd):
            if not os.path.exists(recs):  # the first run's turn: b's runs reach the file first
                cli.run([table, "--root", str(root_b), "--records", recs, "--collect-only"])
            on_done(wd)

        return run(*args, on_done=merge_b_then_done, **kw)

    monkeypatch.setattr(runner, "run", run_with_a_merge_meanwhile)
    assert cli.run([table, "--root", str(root_a), "--records", recs, "--only", "^a$"])["done"] == 2
    assert sorted(r["row"] for r in records_lib.load(recs)) == ["a", "a", "b", "b"]

    # The read-merge-write waits for another command's.
    finished = threading.Event()
    merge = lambda: cli.run([table, "--root", str(root_b), "--records", recs, "--collect-only"])  # noqa: E731
    with cli._records_lock(recs):
        worker = threading.Thread(target=lambda: (merge(), finished.set()))
        worker.start()
        assert not finished.wait(0.5)
    worker.join(30)
    assert finished.is_set() and len(records_lib.load(recs)) == 4


def test_a_recorded_run_that_an_unrecorded_one_needs_is_run_again(tmp_path, monkeypatch, capsys):
    """SHOT-like rows read the workdir of the run they need: in a new root, a recorded source
    run is made again when its adapted run is not recorded yet, and only then."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    rows = "Row('src', GOOD, 'base=0.5'), Row('adapt', GOOD, 'base=0.1', needs={'source': 'src'})"
    table, recs = _write_table(tmp_path, rows), str(tmp_path / "fake.runs.jsonl")
    cli.run([table, "--root", str(tmp_path / "r1"), "--records", recs, "--only", "^src$"])
    assert [r["row"] for r in records_lib.load(recs)] == ["src", "src"]
    capsys.readouterr()
    cli.run([table, "--root", str(tmp_path / "r2"), "--records", recs, "--seeds", "0"])
    calls = (tmp_path / "r2" / "fake" / "calls.txt").read_text().split()
    _, t = spec_lib.load(table)
    by_wd = {j.workdir(str(tmp_path / "r2"), "fake"): j for j in jobs_lib.expand(t)}
    assert [(by_wd[c].row, by_wd[c].seed) for c in calls] == [("src", 0), ("adapt", 0)]
    assert sorted(r["row"] for r in records_lib.load(recs)) == ["adapt", "src", "src"]
    assert (
        cli.run([table, "--root", str(tmp_path / "r3"), "--records", recs, "--seeds", "0"])["done"]
        == 0
    )


def test_a_record_of_a_run_that_needs_another_is_dropped_when_its_config_changes(
    tmp_path, monkeypatch, capsys
):
    """The hash of a SHOT-like run covers the workdir it read (an argument that varies by
    root): it is recomputed with the workdir its command line named, so a change of its config
    file is found, and an unchanged one keeps its record."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(HASHING_TRAINER)
    monkeypatch.setattr(runner, "PROGRAM", [sys.executable, str(script)])
    adapt_py = str(tmp_path / "adapt.py")
    table = _write_table(
        tmp_path,
        f"Row('src', GOOD, 'base=0.5'), Row('adapt', {adapt_py!r}, needs={{'source': 'src'}})",
    )
    for name in ("good.py", "adapt.py"):
        (tmp_path / name).write_text(
            "import ml_collections\n"
            "def get_config(arg=None):\n"
            f"    return ml_collections.ConfigDict({{**{REQUIRED!r}, 'lr': 0.1, 'arg': arg}})\n"
        )
    recs = str(tmp_path / "fake.runs.jsonl")
    cli.run([table, "--root", str(tmp_path / "r1"), "--records", recs, "--seeds", "0"])
    _, t = spec_lib.load(table)
    by_key = {j.key: j for j in jobs_lib.expand(t)}
    (adapt,) = [r for r in records_lib.load(recs) if r["row"] == "adapt"]
    job = by_key[adapt["key"]]
    needed = job.recorded_needs(adapt["provenance"]["argv"])
    assert needed == {"source": by_key[job.needs[0][1]].workdir(str(tmp_path / "r1"), "fake")}
    assert job.config_hash(needed) == adapt["provenance"]["config_hash"]
    assert job.config_hash() is None and job.recorded_needs(["train"]) is None
    assert (
        cli.run([table, "--root", str(tmp_path / "r2"), "--records", recs, "--seeds", "0"])["done"]
        == 0
    )

    (tmp_path / "adapt.py").write_text((tmp_path / "adapt.py").read_text().replace("0.1", "0.2"))
    capsys.readouterr()
    result = cli.run([table, "--root", str(tmp_path / "r3"), "--records", recs, "--seeds", "0"])
    assert "adapt seed=0 (" in capsys.readouterr().out.split("its config changed since the run")[0]
    assert result["done"] == 2  # the source again (its workdir is read), then the adaptation
    assert len(records_lib.load(recs)) == 2


def test_each_cell_is_compared_with_the_baseline_row(tmp_path):
    """`baseline=`: the difference of means and its standard error (float64 numpy here), ↑ / ↓
    only beyond 2 standard errors; nothing for the baseline itself or a cell without runs; the
    verdicts listed per column, a cell judged only once all its runs have finished."""
    hand = _hand_table()
    rows = [*hand.rows, Row("worse", "d.py", columns=["A"]), Row("partial", "e.py")]
    table = dataclasses.replace(hand, rows=rows, baseline="base")
    root = str(tmp_path)
    values = {
        ("base", "A"): [0.60, 0.62, 0.65],
        ("new", "A"): [0.70, 0.66, 0.71],
        ("oracle", "A"): [0.61, 0.66, 0.60],
        ("worse", "A"): [0.50, 0.53, 0.49],
        ("partial", "A"): [0.40, 0.41],  # its seed 2 never finishes
    }
    for (row_label, _), accs in values.items():
        row = next(r for r in table.rows if r.label == row_label)
        for job, acc in zip(jobs_lib.row_jobs(table, row, "d=a"), accs, strict=False):
            _finish(job.workdir(root, "hand"), {"step": 9, "eval/target/accuracy": acc})
    cells = aggregate.collect(table, "hand", root, "last")
    base = np.array(values["base", "A"], np.float64)
    expected = {}
    for label in ("new", "oracle", "worse"):
        x = np.array(values[label, "A"], np.float64)
        se = np.sqrt(x.var(ddof=1) / 3 + base.var(ddof=1) / 3)
        expected[label] = (100 * (x.mean() - base.mean()), 100 * se)
    assert expected["new"][0] > 2 * expected["new"][1]  # 6.7 against 2 x 2.1
    assert expected["oracle"][0] < 2 * expected["oracle"][1]  # 0.0 against 2 x 2.3
    assert -expected["worse"][0] > 2 * expected["worse"][1]  # -11.7 against 2 x 1.9
    md = render.markdown(table, cells, "last", "last")
    d, s = expected["new"]
    assert f"| new | **69.0 ± 2.6** (3), Δ {d:+.1f} ± {s:.1f} ↑ | — | missing (0 of 3) |" in md
    d, s = expected["oracle"]
    assert f"| oracle † | 62.3 ± 3.2 (3), Δ {d:+.1f} ± {s:.1f} | — | n/a |" in md
    assert "| base | 62.3 ± 2.5 (3) | 61.5 ± 0.4 [1] | missing (0 of 3) |" in md
    d, s = expected["worse"]
    assert f"| worse | 50.7 ± 2.1 (3), Δ {d:+.1f} ± {s:.1f} ↓ | — | n/a |" in md
    assert "↑ / ↓: better / worse than base by more than 2 standard errors" in md
    assert "- A: ↑ new; ↓ worse; not judged partial.\n- B: not judged new, partial.\n" in md
    rows = list(csv.DictReader(io.StringIO(render.csv_text(table, cells, "last"))))
    by = {(r["row"], r["column"]): r for r in rows}
    assert float(by["new", "A"]["delta"]) == pytest.approx(expected["new"][0])
    assert float(by["new", "A"]["delta_se"]) == pytest.approx(expected["new"][1])
    assert by["new", "A"]["better_than_baseline"] == "1"
    assert by["oracle", "A"]["better_than_baseline"] == "0"
    assert by["worse", "A"]["worse_than_baseline"] == "1"
    assert by["new", "A"]["worse_than_baseline"] == "0"
    assert by["base", "A"]["delta"] == "" and by["new", "B"]["delta"] == ""
    tex = render.latex(table, cells, "last", "last")
    assert r"$\Delta$ +" in tex and r"$\uparrow$" in tex and r"$\downarrow$" in tex
    with pytest.raises(UserError, match="baseline='nope' is not a row label"):
        spec_lib.check(dataclasses.replace(table, baseline="nope"))


def test_a_tie_in_the_selection_metric_goes_to_the_grid_point_listed_first(tmp_path):
    """A small validation split ties often (90 UCI images): the first value listed wins."""
    table = Table(
        title="t",
        rows=[Row("tuned", "b.py", grid={"adaptation.weight": [3.0, 0.3, 1.0]})],
        columns=[Column("T", "eval/target/accuracy")],
        seeds=(0,),
        select_metric="eval/source_val/accuracy",
    )
    for job in jobs_lib.expand(table):
        w = dict(job.grid_point)["adaptation.weight"]
        summary = {"step": 5, "eval/source_val/accuracy": 0.9 if w != "0.3" else 0.8,
                   "eval/target/accuracy": {"3.0": 0.5, "0.3": 0.9, "1.0": 0.7}[w]}  # fmt: skip
        _finish(job.workdir(str(tmp_path), "t"), summary, [summary])
    cells = aggregate.collect(table, "t", str(tmp_path), "last")
    assert cells["tuned", "T"].hparams == {"adaptation.weight": "3.0"}
    assert "(a tie goes to the point listed first)" in render.markdown(table, cells, "last", "")


def test_a_grid_point_whose_runs_diverged_is_passed_over_and_the_cell_judged(tmp_path):
    """A diverged run does not change when run again: the cell is chosen from the other points,
    says how many diverged, and is judged against the baseline; the runs stay listed."""
    table = Table(
        title="d",
        rows=[Row("src", "a.py"), Row("mcc", "b.py", grid={"adaptation.weight": [1.0, 3.0]})],
        columns=[Column("T", "eval/target/accuracy")],
        seeds=(0, 1),
        select_metric="eval/source_val/accuracy",
        baseline="src",
    )
    for job in jobs_lib.expand(table):
        wd = job.workdir(str(tmp_path), "d")
        if dict(job.grid_point).get("adaptation.weight") == "3.0":
            os.makedirs(wd)
            with open(os.path.join(wd, jobs_lib.DIVERGED), "w") as f:
                json.dump({"said": "Non-finite training metrics at step 9"}, f)
            continue
        acc = {"src": 0.50, "mcc": 0.20}[job.row] + 0.01 * job.seed
        summary = {"step": 5, "eval/source_val/accuracy": 0.9, "eval/target/accuracy": acc}
        _finish(wd, summary, [summary])
    cells = aggregate.collect(table, "d", str(tmp_path), "last")
    cell = cells["mcc", "T"]
    assert cell.hparams == {"adaptation.weight": "1.0"}
    assert cell.values == pytest.approx([0.20, 0.21])
    assert (cell.points, cell.points_finished, cell.points_diverged) == (2, 2, 1)
    md = render.markdown(table, cells, "last", "last")
    assert "| mcc | 20.5 ± 0.7 (2) [weight=1.0; 1 of 2 points diverged], Δ -30.0 ± 0.7 ↓ |" in md
    assert "- T: ↓ mcc." in md
    assert "- mcc, seed 1: diverged (Non-finite training metrics at step 9)" in md


def test_a_table_says_what_its_runs_rest_on():
    """Run count, compute, software, devices and commits from the records' `done` markers and
    provenance; several stacks are counted, and a dirty checkout is told apart by what changed."""
    soft = {"jax": "0.10.2", "flax": "0.12.8", "python": "3.11.7"}
    cpu = {"device_kind": "cpu", "device_count": 1, "platform": "cpu", "usable_cpus": 2}

    def rec(wall, commit, versions=soft, **git):
        prov = {**cpu, "versions": versions, "git": {"commit": commit * 40, **git}}
        return {"done": {"wall_s": wall}, "provenance": prov}

    recs = [
        rec(100.0, "a", dirty=False, changed=[]),
        rec(300.0, "a", dirty=True, changed=["experiments/tables/results/x.runs.jsonl"]),
        rec(200.0, "b", dirty=True, changed=["README.md", "xmodal_jax/tasks/two_tower.py"]),
        rec(50.0, "b", {**soft, "jax": "0.11.2"}, dirty=False),
        {"done": {"wall_s": 10.0}, "provenance": None},
    ]
    recs[3]["provenance"]["cpu_convolutions"] = "xla"  # the others: before the field, YNNPACK
    recs[3]["provenance"] |= {"cpu_model": "AMD EPYC", "cpu_simd": "AVX2"}  # the others: before
    assert records_lib.describe(recs) == [
        f"5 runs, {660 / 3600:.1f} h of compute in all (median 100 s a run).",
        "Software (2 different): flax 0.12.8, jax 0.10.2, python 3.11.7 (3 runs); "
        "flax 0.12.8, jax 0.11.2, python 3.11.7 (1 run).",
        "Devices (2 different): cpu x1 (2 CPUs, YNNPACK convolutions) (3 runs); "
        "cpu x1 (2 CPUs: AMD EPYC, AVX2; XLA convolutions) (1 run).",
        "Commits (2 different): aaaaaaa (2 runs); bbbbbbb (2 runs); 2 runs from a checkout with "
        "uncommitted changes (1 of them to code, 1 to records or docs only).",
        "1 run without provenance.",
    ]
    older = [rec(1.0, "c", dirty=True), rec(1.0, "c", dirty=True, changed=["a.py"])]
    assert records_lib.describe(older)[-1] == (
        "Commits: ccccccc; 2 runs from a checkout with uncommitted changes."
    )  # which files changed is unknown for the first: no split is claimed
    assert records_lib.describe([]) == []
    named = rec(1.0, "d")
    named["provenance"] |= {"device_kind": "cpu", "device_count": 1, "platform": "cpu"}
    named["provenance"] |= {"usable_cpus": 2, "cpu_model": "AMD EPYC", "cpu_simd": "AVX-512"}
    named["provenance"]["cpu_family"] = "family 26, model 2"
    assert records_lib.describe([named])[2] == (
        "Devices: cpu x1 (2 CPUs: AMD EPYC (family 26, model 2), AVX-512; YNNPACK convolutions)."
    )
    untimed = {"done": {}, "provenance": None}  # run by a `--dry-run` line: no wall time
    assert records_lib.describe([rec(100.0, "a"), untimed])[0] == (
        f"2 runs, {100 / 3600:.1f} h of compute in all (median 100 s a run; 1 run without a "
        "wall time, not counted)."
    )
    assert records_lib.describe([untimed, untimed])[0] == "2 runs, no wall time recorded."
    # CPU time where the markers record it (since `runner.wait`): said apart from the wall time.
    timed = [rec(100.0, "a"), rec(300.0, "a"), rec(50.0, "a")]
    timed[0]["done"]["cpu_s"], timed[1]["done"]["cpu_s"] = 180.0, 3600.0
    assert records_lib.describe(timed)[0] == (
        f"3 runs, {450 / 3600:.1f} h of compute in all (median 100 s a run); CPU time of the 2 "
        f"runs that record it: {3780 / 3600:.1f} h (user + system, median 1890 s a run)."
    )
    timed[2]["done"]["cpu_s"] = 0.0
    assert records_lib.describe(timed)[0].endswith(
        "; CPU time: 1.1 h (user + system, median 180 s a run)."
    )


def test_provenance_names_the_cpu_and_its_widest_vector_extension(tmp_path):
    from xmodal_jax import provenance

    cases = {
        "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n": "AVX-512",
        "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2\n": "AVX2",
        "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n": "NEON",
        "flags\t\t: fpu sse2\n": "",
    }
    for i, (text, want) in enumerate(cases.items()):
        (tmp_path / str(i)).write_text(text)
        assert provenance.cpu_simd(str(tmp_path / str(i))) == want, text
    assert provenance.cpu_simd(str(tmp_path / "none")) == ""
    prov = provenance.describe({"a": 1})
    assert prov["cpu_model"] == provenance.cpu_model() and prov["cpu_simd"] == provenance.cpu_simd()


def test_cpu_family_tells_processors_behind_one_model_name_apart(tmp_path):
    from xmodal_jax import provenance

    zen5 = "processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    cases = {
        zen5 + "\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\n": "family 26, model 2",
        "processor\t: 0\nmodel name\t: AMD EPYC\n": "",  # no family: not named
        "processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n": "",  # Arm
    }
    for i, (text, want) in enumerate(cases.items()):
        (tmp_path / str(i)).write_text(text)
        assert provenance.cpu_family(str(tmp_path / str(i))) == want, text
    assert provenance.cpu_family(str(tmp_path / "none")) == ""
    assert provenance.describe({"a": 1})["cpu_family"] == provenance.cpu_family()


def test_provenance_names_the_files_changed_since_the_commit(tmp_path):
    import subprocess

    from xmodal_jax import provenance

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    for name in ("a.py", "b.md"):
        (tmp_path / name).write_text("x\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    state = provenance.git_state(str(tmp_path))
    assert len(state["commit"]) == 40 and state["dirty"] is False and state["changed"] == []
    (tmp_path / "b.md").write_text("y\n")
    (tmp_path / "a.py").write_text("y\n")
    (tmp_path / "new.py").write_text("untracked: not a change of the checkout's code\n")
    state = provenance.git_state(str(tmp_path))
    assert state["dirty"] is True and state["changed"] == ["a.py", "b.md"]


def test_jobs_share_a_compilation_cache_per_machine(monkeypatch, tmp_path):
    """A table's trainers get JAX's persistent compilation cache under the cache root, one
    directory per host; a directory the user set is kept; the lock descriptor is passed."""
    import socket

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    env = runner.trainer_env(7)
    want = tmp_path / "jax_compilation" / socket.gethostname()
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(want)
    assert env[runner.workdir_lock.FD_ENV] == "7" and env["XMODAL_CACHE"] == str(tmp_path)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/mine")
    assert runner.trainer_env(7)["JAX_COMPILATION_CACHE_DIR"] == "/mine"
