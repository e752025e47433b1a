"""The metric writer: JSON lines and TensorBoard events, without importing PyTorch."""

import json
import subprocess
import sys

RUN = """
import json, os, sys
from xmodal_jax.train import metrics
w = metrics.MetricWriter(sys.argv[1])
w.write(1, {"train/loss": 0.5})
w.close()
print(json.dumps({"torch_imported": "torch" in sys.modules,
                  "events": os.listdir(os.path.join(sys.argv[1], "tensorboard"))}))
"""


def test_writes_lines_and_events_without_importing_torch(tmp_path):
    # In a fresh process: other test modules import torch (their oracle).
    r = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["torch_imported"]  # tensorboardX imports it when installed, unless kept out
    assert len(out["events"]) == 1 and out["events"][0].startswith("events.out.tfevents")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 0.5}]
