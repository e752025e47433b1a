"""A workdir on `gs://` goes through `etils.epath` (and Orbax) only, never through local file calls.

No bucket can be reached here, so `gs://` is faked at the two places where this codebase's file
access leaves Python for the network: fsspec's `gs` filesystem (what `etils.epath` uses for
`gs://` without TensorFlow; here a local directory stands in for the buckets), and the
TensorStore key-value store that Orbax builds for array data on `gs://` (here TensorStore's
`file` driver on the same directory). Everything above them runs as it would against a bucket:
Orbax's `gs://` code path (commit-file atomicity instead of renames), Grain's iterator state,
metrics, summaries, plots and TensorBoard events. Not covered: gcsfs and TensorStore's `gcs`
driver themselves.

The runs start in an empty working directory: a writer that used `open`/`os.makedirs` on the
`gs://` string would either fail or leave a `gs:` folder there, and the tests check both.
"""

import importlib
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
from fake_gcs import clear_caches, route_gs

from xmodal_jax.train import trainer, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = "gs://xmodal-test-bucket/runs/digits"
CONFIG = """
from experiments.digits.digits_common import base_config


def get_config(arg=None):
    c = base_config("direction=m2u")
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 4, 2
    c.evals = {"target": {**c.evals.target, "split": "test[:256]"}}
    c.best_metric = "eval/target/accuracy"
    return c
"""


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """Routes `gs://` to `tmp_path/buckets`; runs in the empty directory `tmp_path/cwd`."""
    from orbax.checkpoint._src.path import gcs_utils

    buckets = tmp_path / "buckets"
    buckets.mkdir()
    route_gs(monkeypatch, buckets)

    def kvstore(path):
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(buckets, bucket, key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(workdir_lock, "SETTLE_SECS", 0.0)  # one command at a time here
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("XMODAL_DISTRIBUTED", "off")
    yield buckets / WORKDIR[len("gs://") :]
    clear_caches()
    assert not os.listdir(cwd), f"local file calls on the gs:// workdir: {os.listdir(cwd)}"


def _xmodal(*args) -> dict:
    from xmodal_jax import main

    return main.run(list(args))


def _rows(path) -> list[dict]:
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [
            {k: v for k, v in json.loads(line).items() if k not in trainer.WALL_CLOCK_KEYS}
            for line in f
        ]


def test_training_in_a_gs_workdir_matches_a_local_one(fake_gcs, tmp_path, tfds_dir):
    config = str(tmp_path / "config.py")
    with open(config, "w") as f:
        f.write(CONFIG)
    local = str(tmp_path / "local")
    _xmodal("train", "--config", config, "--workdir", local)

    _xmodal("train", "--config", config, "--workdir", WORKDIR)
    bucket = str(fake_gcs)
    for name in ("config.json", "metrics.jsonl", "summary.json", "plots/curves.png",
                 "plots/confusion_target.png"):  # fmt: skip
        assert os.path.getsize(os.path.join(bucket, name)) > 0, name
    assert not [n for n in os.listdir(os.path.join(bucket, "plots")) if n.endswith(".tmp")]
    (events,) = os.listdir(os.path.join(bucket, "tensorboard"))
    assert events.startswith("events.out.tfevents.")
    assert os.path.getsize(os.path.join(bucket, "tensorboard", events)) > 0
    # Orbax took its gs:// path: checkpoints committed in place by a commit file, not renamed.
    assert sorted(os.listdir(os.path.join(bucket, "checkpoints"))) == ["2", "4"]
    assert "commit_success.txt" in os.listdir(os.path.join(bucket, "checkpoints", "4"))
    assert os.listdir(os.path.join(bucket, "best")) == os.listdir(os.path.join(local, "best"))
    assert _rows(bucket) == _rows(local)

    # Resume from step 2 (as if the run had been stopped after it): the bucket's metrics are
    # cut back to step 2 and the same rows are logged again.
    shutil.rmtree(os.path.join(bucket, "checkpoints", "4"))
    os.remove(os.path.join(bucket, "summary.json"))
    resumed = _xmodal("train", "--config", config, "--workdir", WORKDIR)
    assert _rows(bucket) == _rows(local)
    with open(os.path.join(local, "summary.json")) as f:
        expected = json.load(f)
    with open(os.path.join(bucket, "summary.json")) as f:
        assert json.load(f) == expected
    for key, value in resumed.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, err_msg=key)

    # `eval` restores the bucket's latest checkpoint.
    again = _xmodal("eval", "--config", config, "--workdir", WORKDIR)
    assert again == resumed


@pytest.mark.parametrize(
    "workdir, words",
    [("nosuchfs://b/run", ["nosuchfs:// is not supported", "gs://"]),
     ("s3://b/run", ["s3://b/run cannot be reached", "s3fs"])],
)  # fmt: skip
def test_an_unreachable_workdir_is_one_clear_error(workdir, words, monkeypatch, capsys):
    from xmodal_jax import main

    # Make s3:// unreachable whatever is installed: no s3fs, and no TensorFlow (whose gfile
    # would otherwise serve it).
    monkeypatch.setitem(sys.modules, "s3fs", None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "tensorflow" else find_spec(n, *a)
    )
    monkeypatch.setenv("XMODAL_DISTRIBUTED", "off")
    config = os.path.join(ROOT, "experiments", "digits", "source_only.py")
    assert main.main(["train", "--config", config, "--workdir", workdir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


class _PlottingEvaluator:
    """An evaluator with a confusion matrix and its own plot, written with local file calls."""

    confusion = np.array([[3, 1], [0, 4]])
    class_names = ["a", "b"]

    def plot(self, out_dir: str) -> list[str]:
        path = os.path.join(out_dir, "own_ev.png")
        with open(path, "wb") as f:
            f.write(b"\x89PNG fake")
        return [path]


def test_plots_of_evaluators_reach_a_gs_workdir(fake_gcs):
    from xmodal_jax.train import plots

    paths = plots.write_all(WORKDIR, [{"step": 1, "train/loss": 1.0}], {"ev": _PlottingEvaluator()})
    names = ["curves.png", "confusion_ev.png", "own_ev.png"]
    assert paths == [f"{WORKDIR}/plots/{n}" for n in names]
    assert sorted(os.listdir(fake_gcs / "plots")) == sorted(names)
    assert (fake_gcs / "plots" / "own_ev.png").read_bytes() == b"\x89PNG fake"
    assert (fake_gcs / "plots" / "curves.png").read_bytes()[:4] == b"\x89PNG"
