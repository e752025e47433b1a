"""The `xmodal` command end to end: `main.main` in this process (what the console script calls:
same parsing, output and exit codes), and the installed command itself in one subprocess."""

import json
import os
import subprocess
import sys

import pytest

from xmodal_jax import main

CONFIG = "experiments/digits/source_only.py:direction=m2u"
SMALL = ["--config.log_every=5", "--config.eval_every=20", "--config.checkpoint_every=10"]
NO_TSNE = "--config.evals.a_distance.tsne_points=0"  # the plot is 7 s of each run
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xmodal(*args, tfds_dir):
    env = {**os.environ, "TFDS_DATA_DIR": tfds_dir}
    return subprocess.run(
        [sys.executable, "-m", "xmodal_jax.main", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


class Result:
    def __init__(self, returncode, captured):
        self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


def run(capsys, *args) -> Result:
    """`xmodal ARGS` in this process (no cold start, compiles shared with the other tests)."""
    capsys.readouterr()
    rc = main.main(list(args))
    return Result(rc, capsys.readouterr())


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_misspelled_key_is_one_clear_line(tmp_path, tfds_dir):
    # The installed command, as a user types it.
    r = xmodal("train", "--config", CONFIG, "--workdir", str(tmp_path), "--config.lrr=0.1",
               tfds_dir=tfds_dir)  # fmt: skip
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "'lrr'" in lines[0] and "'lr'" in lines[0]
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config", "experiments/digits/source_onyl.py"], ["source_only.py"]),
        (["--config", CONFIG, "--config.data.name=digits_mnist6k"], ["digits_mnist5k"]),
        (["--config", CONFIG, "--config.model.bottleneck=wide"], ["expected int"]),
        (["--config", "experiments/digits/source_only.py:direction=m2u,sed=1"], ["'seed'"]),
    ],
)
def test_bad_names_are_one_clear_line(args, words, tmp_path, tfds_dir, capsys):
    r = run(capsys, "train", *args, "--workdir", str(tmp_path))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_train_resume_and_eval(tmp_path, tfds_dir, capsys):
    wd = str(tmp_path / "run")
    train = ["train", "--config", CONFIG, "--workdir", wd, *SMALL]
    r = run(capsys, *train, "--config.total_steps=20", "--config.evals.a_distance.tsne_points=100")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(wd, "plots", "tsne_a_distance.png"))
    first = _rows(wd)
    assert [x["step"] for x in first if "train/loss" in x] == [5, 10, 15, 20]
    summary = json.load(open(os.path.join(wd, "summary.json")))
    assert {"eval/source/accuracy", "eval/target/accuracy"} <= set(summary)
    assert json.load(open(os.path.join(wd, "config.json")))["total_steps"] == 20

    r = run(capsys, *train, "--config.total_steps=30", NO_TSNE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from the checkpoint of step 20" in r.stdout
    rows = _rows(wd)
    assert rows[: len(first)] == first  # the first run's log is kept as it was
    assert [x["step"] for x in rows if "train/loss" in x] == [5, 10, 15, 20, 25, 30]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["20", "30"]
    assert {"curves.png", "confusion_target.png"} <= set(os.listdir(os.path.join(wd, "plots")))

    # Run again when finished: nothing trains; the final evaluation is redone and timed as one.
    finished = json.load(open(os.path.join(wd, "summary.json")))
    r = run(capsys, *train, "--config.total_steps=30", NO_TSNE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(wd, "summary.json"))) == finished
    timing = json.load(open(os.path.join(wd, "timing.json")))
    assert timing["evaluation"] > 0 and timing["training"] < 1, timing

    r = run(capsys, "eval", "--config", CONFIG, "--workdir", wd)
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = json.load(open(os.path.join(wd, "summary.json")))
    assert evaluated["step"] == 30
    assert evaluated["eval/target/accuracy"] == pytest.approx(rows[-1]["eval/target/accuracy"])


def test_convert_verb(tmp_path, tfds_dir, capsys):
    r = run(capsys, "convert", str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "missing.pth" in r.stderr

    from xmodal_jax.pretrained import asset_path

    dst = tmp_path / "mobilenet.safetensors"
    r = run(capsys, "convert", asset_path("mobilenet-v2-imagenet"), str(dst))
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.numpy import load_file

    tensors = load_file(str(dst))
    # 3,504,872 parameters (torchvision's count) plus the BatchNorm statistics.
    n_params = sum(v.size for k, v in tensors.items() if k.startswith("params/"))
    assert n_params == 3_504_872
