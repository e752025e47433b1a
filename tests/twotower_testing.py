"""Tiny two-tower configs shared by the two-tower, quick start and experiment-config tests."""

import json
import os

import ml_collections

# A 1-block ViT on 28x28 silhouettes and a 1-block BERT on the MiniLM vocabulary: random weights,
# so everything here runs in seconds on 2 CPU cores.
TINY_IMAGE = {
    "tower": "vit_ti16",
    "overrides": {
        "patch_size": 7, "image_size": 28, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
    },
}  # fmt: skip
TINY_TEXT = {
    "tower": "minilm_l6",
    "overrides": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
    "max_len": 12,
}
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")
PP = "grey_to_rgb|value_range(0, 1)|keep('image', 'label')"


def tiny_config(
    *,
    steps: int = 4,
    loss: str = "clip",
    lock_image: bool = True,
    lock_text: bool = True,
    heads: dict | None = None,
    batch_size: int = 32,
    lr: float = 1e-2,
) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "two_tower"
    c.total_steps = steps
    c.batch_size = batch_size
    c.lr = lr
    c.optimizer = {"name": "adam"}
    c.log_every = 1
    c.eval_every = steps
    c.checkpoint_every = 0
    c.keep_checkpoints = 1
    c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.model = {
        "image": {**TINY_IMAGE, "locked": lock_image},
        "text": {**TINY_TEXT, "locked": lock_text},
        "image_proj": {"kind": "linear", "norm": "standardize" if lock_image else "none"},
        "loss": {"name": loss},
    }
    c.data = {
        "name": "animal_silhouettes",
        "split": "train[:4%]",
        "pp": PP,
        "text": "class_names",
        "templates": TEMPLATES,
    }
    c.heads = heads or {}
    c.evals = {}
    c.eval_batch_size = 64
    return c


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir: str) -> list[float]:
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def train_steps(c: ml_collections.ConfigDict, steps: int = 2):
    """`(task, (params, model_state) before, after)` of `steps` trainer steps of config `c`."""
    import jax

    from xmodal_jax import tasks
    from xmodal_jax.parallel import mesh as mesh_lib
    from xmodal_jax.train import optim
    from xmodal_jax.train import step as step_lib

    mesh = mesh_lib.make_mesh(c.mesh)
    task = tasks.build(c)
    tx, lr_fn = optim.build(c)
    it = task.train_iterator(0, 1)
    batch = mesh_lib.global_batch(next(it), mesh)
    init_fn, abstract = step_lib.init_state(c, task, tx, mesh, batch)
    state = init_fn(batch)
    before = jax.device_get((state.params, state.model_state))
    step = step_lib.compile_train_step(c, task, tx, lr_fn, abstract, mesh, batch)
    for _ in range(steps):
        state, _ = step(state, mesh_lib.global_batch(next(it), mesh))
    return task, before, jax.device_get((state.params, state.model_state))
