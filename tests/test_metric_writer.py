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


def test_phase_times_exclude_the_phases_nested_in_them(monkeypatch):
    """Each phase counts its own time, not that of the phases opened inside it, so the totals
    add up to the outer phase's wall time (a clock that moves only when read, by known steps)."""
    from xmodal_jax import timing

    ticks = iter([0.0, 1.0, 4.0, 4.5, 6.0, 10.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    timing.reset()
    with timing.phase("set-up"):  # 0
        with timing.phase("data build"):  # 1 .. 4
            pass
        with timing.phase("feature extraction"):  # 4.5 .. 6
            pass
    # ends at 10: set-up's own time is (1 - 0) + (4.5 - 4) + (10 - 6)
    assert timing.totals() == {"data build": 3.0, "feature extraction": 1.5, "set-up": 5.5}
    assert sum(timing.totals().values()) == 10.0
    assert timing.line({"a": 1.25}) == "Wall time: a 1.2 s"
    timing.reset()
    assert timing.totals() == {}
