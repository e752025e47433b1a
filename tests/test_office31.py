"""Office-31 builder (from fabricated JPEGs in a manual-download folder) and its configs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from xmodal_jax import config as config_lib
from xmodal_jax import main
from xmodal_jax.data import office31, pipeline
from xmodal_jax.errors import UserError


def _colour(label: int, i: int) -> tuple[int, int, int]:
    return (8 * label, 255 - 8 * label, 40 + 100 * i)


def _fake_domain(manual_dir, domain: str, per_class: int = 2) -> None:
    """Solid-colour JPEGs of assorted sizes, the colour fixed by class and index."""
    for label, name in enumerate(office31.CLASS_NAMES):
        folder = manual_dir / domain / "images" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (30 + 7 * i + label, 40 - 3 * i)
            Image.new("RGB", size, _colour(label, i)).save(folder / f"frame_{i:04d}.jpg")


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("office31_manual")
    _fake_domain(path, "amazon", per_class=1)
    _fake_domain(path, "webcam")
    return path


def test_missing_download_names_where_the_files_go(tmp_path, tfds_dir):
    with pytest.raises(UserError, match=r"amazon/images/<class>/\*\.jpg"):
        office31.prepare(str(tmp_path), tfds_dir, ("amazon",))
    (tmp_path / "dslr" / "images" / "bike").mkdir(parents=True)
    (tmp_path / "dslr" / "images" / "bicycle").mkdir(parents=True)
    with pytest.raises(
        UserError, match=r"empty \['back_pack', 'bike', 'bike_h.*unexpected \['bicycle'\]"
    ):
        office31.prepare(str(tmp_path), tfds_dir, ("dslr",))


def test_builder_reads_the_manual_download(manual_dir, tfds_dir):
    office31.prepare(str(manual_dir), tfds_dir, ("amazon", "webcam"))
    assert pipeline.class_names("office31/amazon") == list(office31.CLASS_NAMES)
    src = pipeline.source("office31/webcam", "train")
    assert len(src) == 31 * 2
    seen = set()
    for k in range(len(src)):
        ex = src[k]
        assert ex["image"].shape == (256, 256, 3) and ex["image"].dtype == np.uint8
        label = int(ex["label"])
        # A solid colour survives JPEG and resizing within a few levels; it names the file.
        mean = ex["image"].reshape(-1, 3).mean(0)
        i = int(np.argmin([np.abs(mean - _colour(label, j)).max() for j in range(2)]))
        assert np.abs(mean - _colour(label, i)).max() < 4
        seen.add((label, i))
    assert seen == {(c, i) for c in range(31) for i in range(2)}


@pytest.mark.parametrize("method", ["source_only", "dann", "cdan", "dan", "jan", "mcc"])
def test_configs_load_for_every_task(method):
    for task in ("A2W", "D2W", "W2D", "A2D", "D2A", "W2A"):
        c = config_lib.load(f"experiments/office31/da.py:method={method},task={task}")
        target = f"office31/{office31.DOMAINS[task[2]]}"
        assert c.evals.target.dataset == target and c.model.num_classes == 31
        source = c.data.name if method == "source_only" else c.data.source.name
        assert source == f"office31/{office31.DOMAINS[task[0]]}"
        losses = {"dann": "dann", "cdan": "cdan", "dan": "mmd", "jan": "jmmd", "mcc": "mcc"}
        if method == "source_only":
            assert c.task == "classification" and "adaptation" not in c
        else:
            assert c.task == "domain_adaptation" and c.adaptation.method == losses[method]


def test_the_old_per_method_files_name_the_new_form():
    with pytest.raises(UserError, match=r"is now 'experiments/office31/da.py:method=jan'; write "
                       r"--config experiments/office31/da.py:method=jan,task=W2A\."):  # fmt: skip
        config_lib.load("experiments/office31/jan.py:task=W2A")
    with pytest.raises(UserError, match="method='dnn': use one of"):
        config_lib.load("experiments/office31/da.py:method=dnn")


def test_resnet50_starts_from_torchvision_imagenet_weights_by_default():
    auto = config_lib.load("experiments/office31/da.py:method=dann,task=A2W").pretrained.name
    assert auto == os.path.expanduser("~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth")
    given = config_lib.load("experiments/office31/da.py:method=cdan,pretrained=/w/r50.safetensors")
    assert given.pretrained.name == "/w/r50.safetensors"
    for arg in ("pretrained=none", "model=lenet", "width=0.5"):
        c = config_lib.load(f"experiments/office31/da.py:{arg}")
        assert c.pretrained.name is None, arg


def test_missing_imagenet_weights_fail_before_training(tmp_path):
    spec = f"experiments/office31/da.py:method=dann,task=A2W,pretrained={tmp_path}/resnet50.pth"
    with pytest.raises(UserError, match="resnet50.pth.*not an existing file"):
        main.run(["train", "--config", spec, "--workdir", str(tmp_path / "run")])
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow  # the DANN step itself is tested on digits (test_domain_adaptation.py)
@pytest.mark.parametrize(
    "model", ["model=lenet,image_size=28", "model=resnet18,width=0.125,image_size=32"]
)
def test_dann_runs_two_steps_on_the_fabricated_dataset(manual_dir, tfds_dir, tmp_path, model):
    office31.prepare(str(manual_dir), tfds_dir, ("amazon", "webcam"))
    workdir = str(tmp_path / "run")
    spec = f"experiments/office31/da.py:method=dann,task=A2W,{model},steps=2"
    overrides = ["--config.batch_size=8", "--config.eval_batch_size=32"]
    overrides += ["--config.log_every=1", "--config.eval_every=2", "--config.checkpoint_every=0"]
    main.run(["train", "--config", spec, "--workdir", workdir, *overrides])
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 2
    assert 0.0 <= summary["eval/target/accuracy"] <= 1.0
    assert 0.0 <= summary["eval/source/accuracy"] <= 1.0
