"""The quick start config end to end (real pretrained towers, real data) with tiny settings."""

import json
import os

import numpy as np

from xmodal_jax import main

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")
TINY = ",".join(
    [
        "steps=3",
        "splits=2",
        "batch_size=64",
        "train_split=train[:3%]",
        "val_split=train[97%:]",
        "test_split=test[:10%]",
    ]
)


def test_quickstart_runs_end_to_end(tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    workdir = str(tmp_path / "qs")
    result = main.run(["train", "--config", f"{QUICKSTART}:{TINY}", "--workdir", workdir])
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 3
    for key in (
        "eval/seen/accuracy",
        "eval/zeroshot_unseen/accuracy",
        "eval/zeroshot_unseen/split_1/accuracy",
        "eval/zeroshot_unseen_control/accuracy",
        "eval/gzsl/seen",
        "eval/gzsl/unseen",
        "eval/gzsl/harmonic_mean",
        "eval/val_pseudo_unseen/accuracy",
    ):
        assert 0.0 <= summary[key] <= 1.0, key
        assert summary[key] == result[key]
    per_split = [summary[f"eval/zeroshot_unseen/split_{k}/accuracy"] for k in range(2)]
    assert np.mean(per_split) == summary["eval/zeroshot_unseen/accuracy"]
    # Cached: MobileNetV2 features of the train, validation and test splits, and the MiniLM
    # embeddings of the class prompts.
    entries = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "features").glob("*.json")]
    assert sorted(e.get("split", e.get("kind")) for e in entries) == sorted(
        ["train[:3%]", "train[97%:]", "test[:10%]", "class_prompts"]
    )
