"""The benchmarked train steps, built from our zoo, objectives, optimiser rules and trainer.

Each workload is the trainer's own step (`step_lib.make_train_step`) over a task: a CLIP-style
two-tower contrastive step, a ResNet-50 classifier step, a MobileNetV2 + DANN step on source and
target batches, and the digits tables' LeNet + DANN step (28 px, 3 channels, 64 a domain).
`sizes(name, small)` fixes the architecture and batch; the PyTorch references (`torch_ref`) read
the same sizes so both sides compute the same thing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xmodal_jax.bench import measure
from xmodal_jax.errors import UserError
from xmodal_jax.models import zoo
from xmodal_jax.objectives import contrastive
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.tasks.classification import Classification
from xmodal_jax.tasks.domain_adaptation import DomainAdaptation
from xmodal_jax.train import optim
from xmodal_jax.train import step as step_lib

# Full sizes: ViT-B/16 + CLIP text (Radford et al. 2021, Table 20), ResNet-50 at 224 px,
# MobileNetV2 at 96 px. Batches are the CPU defaults (`--batch` scales them for accelerators).
_FULL = {
    "clip": dict(
        image=224,
        patch=16,
        width=768,
        depth=12,
        heads=12,
        proj=512,
        text_width=512,
        text_depth=12,
        text_heads=8,
        vocab=49408,
        context=77,
        batch=2,
    ),
    "resnet50": dict(image=224, width=1.0, stages=(3, 4, 6, 3), classes=1000, batch=4),
    "mnv2_dann": dict(image=96, width=1.0, classes=10, disc=(1024, 1024), batch=16),
    "lenet_dann": dict(
        image=28, channels=3, classes=10, bottleneck=256, disc=(1024, 1024), batch=64
    ),
}
_SMALL = {
    "clip": dict(
        image=32, patch=8, width=64, depth=2, heads=2, proj=32,
        text_width=32, text_depth=2, text_heads=2, vocab=500, context=16, batch=4,
    ),
    "resnet50": dict(image=32, width=0.125, stages=(1, 1, 1, 1), classes=10, batch=4),
    "mnv2_dann": dict(image=32, width=0.25, classes=10, disc=(32, 32), batch=4),
    "lenet_dann": dict(image=28, channels=3, classes=10, bottleneck=32, disc=(32, 32), batch=4),
}  # fmt: skip


def sizes(name: str, small: bool, batch: int | None = None) -> dict[str, Any]:
    """Architecture and batch of workload `name` (per-domain batch for the DANN steps)."""
    out = dict((_SMALL if small else _FULL)[name])
    if batch:
        out["batch"] = batch
    return out


class ClipPairs:
    """CLIP-style two-tower task on matched image-text pairs: the symmetric InfoNCE of
    `objectives.contrastive.clip_loss` with CLIP's learnable temperature."""

    def __init__(self, image: nn.Module, text: nn.Module):
        self.image, self.text = image, text
        self.scale = contrastive.LogitScale()

    def init(self, rng: jax.Array, batch: dict) -> dict:
        ki, kt, ks = jax.random.split(rng, 3)
        params = {
            "img": self.image.init(ki, batch["image"])["params"],
            "txt": self.text.init(kt, batch["text"])["params"],
            "scale": self.scale.init(ks)["params"],
        }
        return {"params": params}

    def loss(self, params, model_state, batch, rng, progress):
        del progress
        rngs = {"dropout": rng}
        zi = self.image.apply({"params": params["img"]}, batch["image"], train=True, rngs=rngs)
        zt = self.text.apply({"params": params["txt"]}, batch["text"], train=True, rngs=rngs)
        log_scale = self.scale.apply({"params": params["scale"]})
        loss = contrastive.clip_loss(zi["pooled"], zt["pooled"], log_scale)
        return loss, (model_state, {})


def _optimizer(name: str) -> ml_collections.ConfigDict:
    # CLIP trains with AdamW (Radford et al. 2021, sec. 2.5); the CNNs with SGD + momentum.
    opt = (
        {"name": "adamw", "weight_decay": 0.1}
        if name == "clip"
        else {"name": "sgd", "momentum": 0.9}
    )
    return ml_collections.ConfigDict({"lr": 1e-3, "total_steps": 1000, "optimizer": opt})


def _clip(sz: dict, dtype: Any, scan: bool, remat: str) -> tuple[ClipPairs, dict]:
    image = zoo.build(
        "vit_b16", patch_size=sz["patch"], image_size=sz["image"], width=sz["width"],
        depth=sz["depth"], num_heads=sz["heads"], mlp_dim=4 * sz["width"], pre_norm=True,
        proj_dim=sz["proj"], scan_layers=scan, remat_policy=remat, dtype=dtype,
    )  # fmt: skip
    text = zoo.build(
        "clip_text_b", vocab_size=sz["vocab"], context_length=sz["context"],
        width=sz["text_width"], depth=sz["text_depth"], num_heads=sz["text_heads"],
        proj_dim=sz["proj"], scan_layers=scan, remat_policy=remat, dtype=dtype,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    b, n = sz["batch"], sz["context"]
    ids = rng.integers(1, sz["vocab"] - 1, (b, n)).astype(np.int32)
    ids[np.arange(b), rng.integers(2, n, b)] = sz["vocab"] - 1  # one end-of-text token each
    batch = {"image": _images(rng, b, sz["image"]), "text": ids}
    return ClipPairs(image, text), batch


def _images(rng: np.random.Generator, b: int, size: int, channels: int = 3) -> np.ndarray:
    return rng.standard_normal((b, size, size, channels), np.float32)


def _classification(sz: dict, dtype: Any, pool: str | None) -> tuple[Classification, dict]:
    model = {"name": "resnet50", "num_classes": sz["classes"], "width": sz["width"],
             "stage_sizes": tuple(sz["stages"]), "dtype": dtype}  # fmt: skip
    config = ml_collections.ConfigDict({"model": model | ({"pool": pool} if pool else {})})
    rng = np.random.default_rng(0)
    b = sz["batch"]
    batch = {"image": _images(rng, b, sz["image"]), "label": rng.integers(0, sz["classes"], b)}
    return Classification(config), batch


def _dann(
    sz: dict, dtype: Any, depthwise: str, lenet: bool, pool: str | None
) -> tuple[DomainAdaptation, dict]:
    if lenet:  # the digits LeNet (float32 only: `build` refuses another dtype)
        model = {"name": "lenet", "num_classes": sz["classes"], "bottleneck": sz["bottleneck"]}
        model |= {"pool": pool} if pool else {}
    else:
        model = {"name": "mobilenet_v2", "num_classes": sz["classes"], "width": sz["width"],
                 "depthwise": depthwise, "dtype": dtype}  # fmt: skip
    config = ml_collections.ConfigDict(
        {
            "model": model,
            "adaptation": {"method": "dann", "hidden": tuple(sz["disc"])},
            "data": {"source": {}, "target": {}},
        }
    )
    rng = np.random.default_rng(0)
    b, c = sz["batch"], sz.get("channels", 3)
    batch = {
        "source": {
            "image": _images(rng, b, sz["image"], c),
            "label": rng.integers(0, sz["classes"], b).astype(np.int32),
        },
        "target": {"image": _images(rng, b, sz["image"], c)},
    }
    return DomainAdaptation(config), batch


@dataclasses.dataclass
class Built:
    """A workload ready to run: the compiled step, its state and device-resident batch."""

    runner: measure.StepRunner
    examples_per_step: int
    params: int


def _build_sharded(task, batch: dict, tx, lr_fn, examples: int) -> Built:
    """The trainer's sharded step on a mesh of every local device on `fsdp` (see `build`)."""
    axes = {"data": 1, "fsdp": -1, "model": 1}
    config = ml_collections.ConfigDict(
        {"seed": 0, "total_steps": 1000, "batch_size": examples, "mesh": axes}
    )
    mesh = mesh_lib.make_mesh(axes)
    step_lib.check_batch(config, mesh)
    batch = mesh_lib.global_batch(batch, mesh)
    init_fn, abstract = step_lib.init_state(config, task, tx, mesh, batch)
    start = time.perf_counter()
    lowered = step_lib.lower_train_step(config, task, tx, lr_fn, abstract, mesh, batch)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    # The lowered program is the whole mesh's computation; the compiled one a device's share.
    whole = measure.flops_of(lowered)
    share = whole / mesh.size if whole is not None else None
    flops, source = measure.plausible_flops(measure.flops_of(compiled), share)
    timed = measure.Compiled(compiled, seconds, flops, measure.peak_bytes_of(compiled), source)
    state = init_fn(batch)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return Built(measure.StepRunner(timed, state, batch), examples, n_params)


def build(
    name: str,
    sz: dict,
    *,
    dtype: Any = jnp.float32,
    scan: bool = False,
    remat: str = "none",
    depthwise: str = "auto",
    pool: str | None = None,  # the model's max-pool form (LeNet, ResNet); None: its default
    donate: bool = True,
    fsdp: bool = False,
) -> Built:
    """Our train step for workload `name` at sizes `sz`, compiled for one device; with `fsdp`,
    the trainer's own sharded path instead (`step.init_state` and `step.compile_train_step`:
    the state placed by the sharding rules with FSDP over every local device, the batch split
    over them), so that its cost beside the plain step is known before a pod."""
    if name == "clip":
        task, batch = _clip(sz, dtype, scan, remat)
        examples = sz["batch"]
    elif name == "resnet50":
        task, batch = _classification(sz, dtype, pool)
        batch["label"] = batch["label"].astype(np.int32)
        examples = sz["batch"]
    else:
        if name == "lenet_dann" and jnp.dtype(dtype) != jnp.float32:
            raise UserError(f"lenet_dann runs in float32 only (LeNet has no dtype), not {dtype}.")
        task, batch = _dann(sz, dtype, depthwise, lenet=name == "lenet_dann", pool=pool)
        examples = 2 * sz["batch"]
    tx, lr_fn = optim.build(_optimizer(name))
    if fsdp:
        built = _build_sharded(task, batch, tx, lr_fn, examples)
    else:
        batch = jax.device_put(batch)
        state = jax.jit(lambda b: _initial_state(task, tx, b))(batch)
        step = step_lib.make_train_step(task, tx, lr_fn, total=1000)
        jitted = jax.jit(step, donate_argnums=0 if donate else ())
        compiled = measure.compile_jit(jitted, state, batch)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        built = Built(measure.StepRunner(compiled, state, batch), examples, n_params)
    if scan and name == "clip":  # the only workload with layer stacks to scan
        c = built.runner.compiled
        c.flops, c.flops_source = _unrolled_flops(sz, dtype, remat, tx, lr_fn), "unrolled"
    return built


def _initial_state(task, tx, batch: dict) -> step_lib.TrainState:
    variables = dict(nn.unbox(task.init(jax.random.key(0), batch)))
    params = variables.pop("params")
    return step_lib.TrainState(
        step=jnp.int32(0),
        params=params,
        model_state=variables,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(1)),
    )


def _unrolled_flops(sz: dict, dtype: Any, remat: str, tx, lr_fn) -> float | None:
    """FLOPs of the CLIP step with its layer stacks unrolled (the same remat policy), from the
    lowered program (nothing compiled): XLA's cost analysis counts the body of a scanned stack's
    loop once, not once per layer."""
    task, batch = _clip(sz, dtype, scan=False, remat=remat)
    state = jax.eval_shape(lambda b: _initial_state(task, tx, b), batch)
    step = step_lib.make_train_step(task, tx, lr_fn, total=1000)
    return measure.flops_of(jax.jit(step).lower(state, batch))
