"""The zero-shot protocol holds in every two-tower config of `experiments/`: no image of a class
a head holds out reaches that head's training, and a locked tower (by `locked` or by an Optax
rule) runs in inference mode, its variables bit-identical after training."""

import glob
import os

import jax
import numpy as np
import pytest
from test_animals_configs import tiny
from twotower_testing import tiny_config, train_steps

from xmodal_jax import config as config_lib
from xmodal_jax import tasks

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _class_name_configs() -> list[str]:
    """Every config file of `experiments/` whose task is two-tower on class names."""
    found = []
    for path in sorted(glob.glob(f"{EXPERIMENTS}/**/*.py", recursive=True)):
        text = open(path).read()
        if "def get_config" not in text:
            continue
        c = config_lib.load(path)
        if c.get("task") == "two_tower" and c.data.get("text", "class_names") == "class_names":
            found.append(os.path.relpath(path, EXPERIMENTS))
    return found


CONFIGS = _class_name_configs()


def test_every_animals_config_is_checked():
    # The list above is discovered, not typed: make sure discovery sees the known configs.
    assert {"quickstart.py", "animals/locked_text.py", "animals/unlocked.py"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_no_held_out_class_reaches_training(name, tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    c = tiny(config_lib.load(os.path.join(EXPERIMENTS, name)))
    task = tasks.build(c)
    trained = [set(h.train_classes) for h in task.heads]
    union = set().union(*trained)
    seen_labels = set()
    it = task.train_iterator(0, 1)
    for _ in range(6):  # a few epochs of the tiny split
        seen_labels |= {int(x) for x in next(it)["label"]}
    assert seen_labels <= union, f"classes no head trains on reached training: {name}"
    if len(task.heads) == 1:
        unseen = set(range(len(task.class_names))) - trained[0]
        assert unseen, name  # each of these configs holds classes out
        assert not seen_labels & unseen
    assert len(seen_labels) >= 2  # the check looked at real batches


def test_a_head_learns_nothing_from_its_held_out_classes(tfds_dir, tmp_path, monkeypatch):
    """With several heads on locked towers, head k's gradient is unchanged when the images of
    the classes head k holds out change (other heads train on them)."""
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    heads = {"unseen": [("cat", "dog"), ("bear", "cow")], "control": True}
    c = tiny_config(heads=heads)
    task = tasks.build(c)
    batch = next(task.train_iterator(0, 1))
    variables = jax.jit(task.init)(jax.random.key(0), batch)
    params = variables.pop("params")

    def head_grads(b):
        g = jax.jit(jax.grad(lambda p: task.loss(p, variables, b, jax.random.key(1), 0.0)[0]))(
            params
        )
        return g["heads"]

    labels = np.asarray(batch["label"])
    held_out_0 = np.isin(labels, [task.class_names.index(n) for n in ("cat", "dog")])
    assert held_out_0.any() and not held_out_0.all()
    moved = dict(batch)
    feats = np.array(batch["image_feats"])
    feats[held_out_0] += 3.0
    moved["image_feats"] = feats
    before, after = head_grads(batch), head_grads(moved)
    changed = jax.tree.map(lambda a, b: np.asarray(a != b).any(axis=tuple(range(1, a.ndim))),
                           before, after)  # fmt: skip
    per_head = np.any(np.stack(jax.tree.leaves(changed)), axis=0)
    # Exactly the heads that hold out cat and dog (split 0 and its control) are untouched.
    held = {task.class_names.index(n) for n in ("cat", "dog")}
    untouched = [h.name for h in task.heads if not held & set(h.train_classes)]
    assert untouched == ["split_0", "split_0/control"]
    assert [task.heads[i].name for i in np.flatnonzero(~per_head)] == untouched


# A BatchNorm tower small enough for a few steps on 2 cores.
TINY_RESNET = {
    "tower": "resnet18",
    "overrides": {"width": 0.125, "stage_sizes": (1,), "stem": "small"},
}


def _identical(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.parametrize("how", ["locked", "lit_rule"])
def test_a_locked_tower_is_bit_identical_after_training(how, tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    c = tiny_config(lock_image=how == "locked", lock_text=False, batch_size=16)
    c.model.image = {**TINY_RESNET, "locked": how == "locked"}
    c.model.image_proj.norm = "none"  # standardising needs cached features
    c.data.pp = "flip_lr|" + c.data.pp  # random: the locked tower runs in the step, uncached
    if how == "lit_rule":
        c.transfer = "lit"  # frozen by an Optax rule, not by the task's lock
    task, (p0, s0), (p1, s1) = train_steps(c)
    assert not task.image_cached
    if how == "locked":
        img0, img1 = s0["frozen"]["img"], s1["frozen"]["img"]
        assert _identical(img0, task.image_tower.variables)
    else:
        img0 = {"params": p0["img"], "batch_stats": s0["batch_stats"]["img"]}
        img1 = {"params": p1["img"], "batch_stats": s1["batch_stats"]["img"]}
    assert "batch_stats" in img0  # a BatchNorm tower: training mode would move its statistics
    assert _identical(img0, img1)
    assert not _identical(p0["txt"], p1["txt"])  # the trained tower did train
    assert not _identical(p0["heads"], p1["heads"])  # ... and the heads
