"""The corruption benchmark's configs (`experiments/corruptions/`) and its table: what each
evaluator and run reads, and a source run, its AdaBN / TENT evaluators and a SHOT run from it on
a stand-in for the corrupted data (the embedded `animal_silhouettes`, inverted; the corrupted
datasets themselves are built and tested in test_shift_data.py)."""

import warnings

import numpy as np
import pytest

from experiments.corruptions import adapt, source
from xmodal_jax.data.corruptions import CORRUPTIONS, SEVERITIES
from xmodal_jax.errors import UserError
from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import records, spec
from xmodal_jax.train import plots, trainer

TABLE = "experiments/tables/corruptions.py"


def test_source_config_evaluates_every_corruption_and_severity_at_the_end_only():
    c = source.get_config("dataset=digits_mnist")
    pairs = [f"{k}_{s}" for k in CORRUPTIONS for s in SEVERITIES]
    assert len(pairs) == 95
    assert set(c.evals) == {"source", "source_val"} | {
        f"{p}{x}" for x in pairs for p in ("", "adabn_", "tent_")
    }
    for x in pairs:
        ev, ada, tent = c.evals[x], c.evals[f"adabn_{x}"], c.evals[f"tent_{x}"]
        assert ev.dataset == f"digits_mnist_c/{x}" and ev.split == "test" and ev.every == 0
        assert ada.adapt.dataset == ev.dataset and ada.adapt.split == "train"
        assert tent.type == "tent_classification" and tent.split == "test" and tent.every == 0
    assert c.data.split == "train[:90%]" and c.evals.source_val.split == "train[90%:]"
    assert c.model.norm == "batch"
    small = source.get_config("dataset=animal_silhouettes,corruptions=fog+snow,severities=5")
    assert sorted(small.evals) == sorted(
        ["source", "source_val", "fog_5", "snow_5", "adabn_fog_5", "adabn_snow_5", "tent_fog_5",
         "tent_snow_5"]
    )  # fmt: skip
    for bad, match in (
        ("dataset=cifar10", "dataset='cifar10'"),
        ("corruptions=rain", "corruption='rain'"),
        ("severities=6", "severity=6"),
    ):
        with pytest.raises(UserError, match=match):
            source.get_config(bad)


def test_adapt_configs_target_one_corruption_and_shot_needs_its_source():
    for method in ("dann", "cdan_e", "mcc"):
        c = adapt.get_config(f"method={method},corruption=frost,severity=2,weight=0.3")
        assert c.task == "domain_adaptation" and c.adaptation.to_dict() == {
            "method": method,
            "weight": 0.3,
        }
        assert c.data.source.name == "digits_mnist" and c.data.source.split == "train[:90%]"
        assert c.data.target.name == "digits_mnist_c/frost_2" and c.data.target.split == "train"
        assert c.evals.target.dataset == "digits_mnist_c/frost_2" and c.evals.target.split == "test"
    with pytest.raises(UserError, match="source=<workdir"):
        adapt.get_config("method=shot")
    c = adapt.get_config("method=shot,source=/runs/s0")
    assert c.task == "source_free" and c.source.workdir == "/runs/s0" and c.data.split == "train"
    with pytest.raises(UserError, match="method='tent'"):
        adapt.get_config("method=tent")


def test_the_table_reads_what_the_configs_report():
    """Every metric an evaluator row reads is an evaluator of source.py; the adaptation rows
    run one adapt.py job per corruption and severity, SHOT's after the source run of its seed."""
    _, table = spec.load(TABLE)
    evals = {f"eval/{k}/accuracy" for k in source.get_config().evals}
    read = records.table_metrics(table) - {"eval/target/accuracy", table.select_metric}
    assert read and read <= evals
    jobs = jobs_lib.expand(table)
    by_row = {r.label: [j for j in jobs if j.row == r.label] for r in table.rows}
    assert len(by_row["source only"]) == 6  # 2 datasets x 3 seeds, read by AdaBN and TENT too
    assert not by_row["AdaBN"] and not by_row["TENT"]  # the same jobs, listed once
    assert len(by_row["DANN"]) == 2 * 3 * 95 and len(by_row["MCC"]) == 3 * 2 * 3 * 95
    sources = {(j.seed, dict(j.args)["dataset"]): j.key for j in by_row["source only"]}
    for j in by_row["SHOT"]:
        assert j.needs == (("source", sources[j.seed, dict(j.args)["dataset"]]),)
    shown = [c.label for c in table.columns if not c.csv_only]
    assert shown == [
        f"{d} {g}" for d in ("MNIST", "Animals") for g in ("sev. 3", "sev. 5", "all 95")
    ]


def _stand_in(c, tmp_path=None):
    """The config on the embedded `animal_silhouettes`: small slices, the corrupted splits
    replaced by inverted clean images."""
    c.data.split, c.total_steps, c.batch_size = "train[:4%]", 2, 16
    c.eval_every = c.checkpoint_every = 2
    pp = "invert|" + c.evals.source.pp
    for name, ev in c.evals.items():
        if name.startswith("source"):
            ev.split = "test[:2%]" if name == "source" else "train[90%:92%]"
            continue
        assert ev.dataset == "animal_silhouettes_c/fog_3"
        ev.update(dataset="animal_silhouettes", split="test[:2%]", pp=pp)
        if "adapt" in ev:
            ev.adapt.update(dataset="animal_silhouettes", split="train[4%:6%]", pp=pp)
    if c.task == "source_free":
        c.data.update(name="animal_silhouettes", split="train[4%:8%]", pp=pp)
    return c


def test_a_source_run_then_shot_from_it_on_a_stand_in(tfds_dir, tmp_path):
    c = source.get_config("dataset=animal_silhouettes,corruptions=fog,severities=3")
    out = trainer.train_and_evaluate(_stand_in(c), str(tmp_path / "source"))
    for key in ("fog_3", "adabn_fog_3", "tent_fog_3", "source_val"):
        assert 0.0 <= out[f"eval/{key}/accuracy"] <= 1.0
    # TENT moved the BatchNorm affine parameters on the stream: its entropy is logged.
    assert np.isfinite(out["eval/tent_fog_3/adapt/entropy"])
    c = adapt.get_config(
        f"dataset=animal_silhouettes,method=shot,corruption=fog,severity=3,source={tmp_path}/source"
    )
    out = trainer.train_and_evaluate(_stand_in(c), str(tmp_path / "shot"))
    assert 0.0 <= out["eval/target/accuracy"] <= 1.0


def test_severity_plot_reads_the_severity_columns_of_the_csv(tmp_path):
    from experiments.tables import plot_corruptions

    path = tmp_path / "corruptions.csv"
    path.write_text(
        "row,column,mean,std\n"
        "source only,MNIST sev. 3,60.0,1.5\n"
        "source only,MNIST sev. 1,90.0,\n"
        "source only,MNIST all 95,70.0,1.0\n"  # not a severity: left out
        "TENT,MNIST sev. 3,,\n"  # no finished run: no point
        "TENT,Animals sev. 5,40.0,2.0\n"
    )
    assert plot_corruptions.series(str(path)) == {
        "MNIST": {"source only": [(3, 60.0, 1.5), (1, 90.0, 0.0)]},
        "Animals": {"TENT": [(5, 40.0, 2.0)]},
    }
    out = plot_corruptions.plot(str(path))
    assert out == str(tmp_path / "corruptions_severity.png")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("evaluations", [3, 40])
def test_training_curves_of_many_evaluators_stay_legible(evaluations, tmp_path, monkeypatch):
    """A corruption source run has 285 accuracy series: a panel of many draws them without a
    legend (which could not fit, and made matplotlib give up on the layout); a few keep theirs."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    keys = [f"eval/e{i}/accuracy" for i in range(evaluations)]
    rows = [{"step": 1, "train/loss": 1.0}, {"step": 2, **{k: 0.5 for k in keys}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.curves(rows, tmp_path / "curves.png")
    acc = figures[0].axes[1]
    assert len(acc.lines) == evaluations
    few = evaluations <= plots.MAX_LEGEND
    assert (acc.get_legend() is not None) == few
    assert acc.get_title().startswith("evaluations" if few else f"{evaluations} evaluations")


@pytest.mark.parametrize(
    "table_file",
    [TABLE, "experiments/tables/zeroshot_shift.py", "experiments/tables/tent_clean.py"],
)
def test_each_row_s_first_job_loads_and_reports_what_the_row_reads(table_file):
    from xmodal_jax import config as config_lib

    _, table = spec.load(table_file)
    jobs = jobs_lib.expand(table)
    for row in table.rows:
        job = next((j for j in jobs if j.row == row.label), None)
        if job is None:  # a row that reads another row's runs
            job = next(j for j in jobs if j.config == row.config and j.args == jobs[0].args)
        workdirs = {a: "/runs/source" for a, _ in job.needs}  # a `needs` argument's value
        spec_arg = job.spec + "".join(f",{a}={w}" for a, w in workdirs.items())
        c = config_lib.load(spec_arg)
        reported = {f"eval/{name}/" for name in c.evals}
        for col in table.columns:
            if table.fills(row, col):
                for key in spec.metric_keys(row.metric(col)):
                    assert any(key.startswith(p) for p in reported), (row.label, key)
