"""Every `experiments/animals` config builds and takes two optimiser steps with tiny towers in
place of MobileNetV2 and MiniLM; the ITM configs also run their evaluators on a few test images
(the others use the quick start's evaluators, run end to end in test_quickstart.py)."""

import os

import jax
import numpy as np
import pytest
from twotower_testing import TINY_IMAGE

from xmodal_jax import config as config_lib
from xmodal_jax import evaluators, tasks
from xmodal_jax.models import fusion
from xmodal_jax.train import optim

ANIMALS = os.path.join(os.path.dirname(__file__), "..", "experiments", "animals")
TINY_TEXT = {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
CONFIGS = [
    ("siglip", ""),
    ("clip", ""),
    ("lit", "split=1"),
    ("unlocked_text", "split=0"),
    ("locked_text", "split=0"),
    ("unlocked", "split=2"),
    *[("itm", f"head={head}") for head in sorted(fusion.HEADS)],
]
# One ITM head here, the others in the slow tier (test_fusion.py checks every head's numbers).
QUICK_ITM = "head=concat_mlp"


def tiny(c):
    """Tiny random towers, a small data slice, small batches."""
    image_size = 112  # the configs' inputs: 112 px, random crops for trained image towers
    c.model.image = {
        "tower": TINY_IMAGE["tower"],
        "overrides": {**TINY_IMAGE["overrides"], "patch_size": 28, "image_size": image_size},
        "locked": c.model.image.locked,
    }
    # 6 layers where a config's rules name MiniLM's top block (layer_5).
    depth = 6 if any("layer_5" in r[0] for r in c.get("schedule") or ()) else 1
    text = {**TINY_TEXT, "depth": depth}
    c.model.text = {"tower": "minilm_l6", "overrides": text, "locked": c.model.text.locked}
    c.data.split = "train[:2%]"
    c.batch_size = 16
    for ev in c.evals.values():
        ev.split = "test[:2%]"
    if c.model.get("fusion"):
        c.model.fusion.out_dim = 8
    return c


@pytest.mark.parametrize(
    "name,arg",
    [
        pytest.param(
            n, a, id=f"{n}:{a}", marks=[pytest.mark.slow] * (n == "itm" and a != QUICK_ITM)
        )
        for n, a in CONFIGS
    ],
)
def test_animals_config_steps_and_evaluates(name, arg, tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    c = config_lib.load(f"{ANIMALS}/{name}.py" + (f":{arg}" if arg else ""))
    assert c.model.image.pretrained == "mobilenet-v2-imagenet"
    task = tasks.build(tiny(c))
    tx, _ = optim.build(c)
    it = task.train_iterator(0, 1)
    batch = next(it)
    variables = jax.jit(task.init)(jax.random.key(0), batch)
    params = variables.pop("params")
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, model_state, batch, rng):
        grad_fn = jax.value_and_grad(task.loss, has_aux=True)
        (loss, (model_state, _)), grads = grad_fn(params, model_state, batch, rng, 0.0)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, model_state, loss

    for i in range(2):
        params, opt_state, variables, loss = step(
            params, opt_state, variables, batch, jax.random.key(i)
        )
        assert np.isfinite(float(loss))
        batch = next(it)
    evals = evaluators.build_all(c, task.predict_fns(), None)  # every evaluator's config is valid
    if name == "itm":
        results = evaluators.run_all(evals, {"params": params, **variables})
        assert {"eval/itm/accuracy", "eval/zeroshot_unseen_itm/accuracy"} <= set(results)
        assert all(0.0 <= v <= 1.0 for k, v in results.items() if "accuracy" in k)
