"""Ablations of `xmodal bench`: what each optimisation changes, measured.

`scan_remat` (ViT stack unrolled / `nn.scan` / scan + remat), `donation` (state buffers donated
to the step or not), `bf16` (bfloat16 compute, float32 parameters), `depthwise` (MobileNetV2's
grouped-conv vs shifted multiply-add depthwise convolution, in the train step and in inference,
and the shifted form with its own input gradient), `residuals` (the CLIP and ResNet-50 steps with
their residual streams stored once a block or fused, each in its own process),
`max_pool` (`nn.max_pool` or the elementwise forms of `pooling`: LeNet + DANN's pool, ResNet-50's
stem pool),
`conv_forms` (ResNet-50's 3x3 convolutions as XLA's, in NCHW, as im2col + one GEMM, beside the
GEMM of that size: `conv_forms`),
`cpu_backends` (XLA:CPU's kernel libraries, each in its own process: `backends`), `malloc`
(glibc's allocator with and without the `xmodal` program's setting: `malloc`); for an
accelerator, named only: `fsdp` (the CLIP step plain and through the trainer's sharded path)
and `max_batch` (the largest CLIP batch that fits, unrolled and scanned with remat).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.bench import measure, runner, workloads
from xmodal_jax.errors import UserError
from xmodal_jax.models import residuals, zoo


def _first_updates(name: str, sz: dict, **variant: Any) -> tuple[Any, float, Any]:
    """Parameter change of one train step from the shared initial state, and the step's
    median time: with SGD + momentum the first update is -lr x gradient."""
    built = workloads.build(name, sz, **variant)
    before = jax.device_get(built.runner.state.params)
    built.runner.step()
    after = jax.device_get(built.runner.state.params)
    step_s = measure.median(measure.time_calls(built.runner.step, 10))
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, after, before)
    return delta, step_s, built


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over two pytrees of the same structure, over the largest |a|."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    num = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)
    return num / max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a))


def depthwise_ablation(args) -> dict[str, Any]:
    """MobileNetV2 + DANN train step with the grouped-conv and the shifted depthwise forms:
    step times, and how far apart their first-step gradients are; then the shifted form with
    its own input gradient (`shift_vjp`) against `shift`, alternated in rounds."""
    sz = workloads.sizes("mnv2_dann", args.small, args.batch)
    d_conv, t_conv, b_conv = _first_updates("mnv2_dann", sz, depthwise="conv")
    d_shift, t_shift, b_shift = _first_updates("mnv2_dann", sz, depthwise="shift")
    out = {
        "train_step_conv_s": t_conv,
        "train_step_shift_s": t_shift,
        "compile_conv_s": b_conv.runner.compiled.compile_s,
        "compile_shift_s": b_shift.runner.compiled.compile_s,
        "grad_max_abs_diff_rel": max_rel_diff(d_conv, d_shift),
    }
    del b_conv
    gc.collect()
    d_vjp, _, b_vjp = _first_updates("mnv2_dann", sz, depthwise="shift_vjp")
    calls = {"train_step_shift_alternated_s": b_shift.runner.step,
             "train_step_shift_vjp_alternated_s": b_vjp.runner.step}  # fmt: skip
    out |= runner.alternate(calls, args.steps, args.rounds)
    out["speed_shift_vjp_vs_shift"] = (
        out["train_step_shift_alternated_s"] / out["train_step_shift_vjp_alternated_s"]
    )
    out["grad_shift_vjp_vs_shift_max_abs_diff_rel"] = max_rel_diff(d_shift, d_vjp)
    del b_shift, b_vjp, calls
    gc.collect()
    out.update(mobilenet_forward(args))
    return out


# The max-pool forms compared per workload: (`nn.max_pool`'s form, the elementwise one).
POOLS = {"lenet_dann": ("reduce_window", "tiled"), "resnet50": ("reduce_window", "strided")}


def max_pool_ablation(args) -> dict[str, Any]:
    """The train step with `nn.max_pool` (its gradient is select-and-scatter) and with the
    project's elementwise form (`pooling`), for LeNet + DANN (`tiled_max_pool`) and ResNet-50
    (`max_pool`, its stem pool) where `--workloads` names them (neither: LeNet + DANN): step
    times alternated in one process, and how far apart their first updates are (0 when the
    gradients agree bit for bit). ResNet-50's figures are prefixed `resnet50_`."""
    chosen = [w for w in POOLS if w in getattr(args, "workloads", "").split(",")]
    out: dict[str, Any] = {}
    for name in chosen or ["lenet_dann"]:
        prefix = "" if name == "lenet_dann" else f"{name}_"  # LeNet's keys as in older records
        sz = workloads.sizes(name, args.small, args.batch)
        updates, built = {}, {}
        for pool in POOLS[name]:
            updates[pool], _, built[pool] = _first_updates(name, sz, pool=pool)
        calls = {f"{prefix}train_step_{pool}_s": b.runner.step for pool, b in built.items()}
        times = runner.alternate(calls, args.steps, args.rounds)
        plain, ours = POOLS[name]
        out |= times
        out[f"{prefix}speed_{ours}_vs_{plain}"] = (
            times[f"{prefix}train_step_{plain}_s"] / times[f"{prefix}train_step_{ours}_s"]
        )
        out[f"{prefix}update_max_abs_diff_rel"] = max_rel_diff(updates[plain], updates[ours])
        out[f"{prefix}batch" if prefix else "batch_per_domain"] = sz["batch"]
        del built, calls
        gc.collect()
    return out


RESIDUAL_STACKS = ("clip", "resnet50")  # workloads whose blocks call `residuals.stored`


def residuals_ablation(args) -> dict[str, Any]:
    """The CLIP step (unrolled) and ResNet-50's, where `--workloads` names them (neither: CLIP),
    with their residual streams as XLA's fusion leaves them (`fused`, the reference) and stored
    once a block (`stored`, the default on CPU; `models/residuals.py`), each in a process of its
    own taking turns round after round (`backends.compare`): step times, compile times, the
    instructions in each program's fusions (duplicated producers counted as often as they are
    copied), and the first updates' distance (SGD for ResNet-50: -lr x gradient; AdamW for
    CLIP: about lr x the gradient's sign, so a near-zero gradient that rounds to the other sign
    moves it by up to 2 lr)."""
    from xmodal_jax.bench import backends

    chosen = [w for w in RESIDUAL_STACKS if w in getattr(args, "workloads", "").split(",")]
    settings = ("fused", "stored")
    envs = {s: {**os.environ, residuals.CPU_RESIDUALS_ENV: s} for s in settings}
    variables = {s: f"{residuals.CPU_RESIDUALS_ENV}={s}" for s in settings}
    return {"settings": variables, **backends.compare(envs, args, tuple(chosen or ["clip"]))}


def variant_ablation(name: str, args, peaks: dict, variants: dict[str, dict]) -> dict[str, Any]:
    """Step time, compile time and peak memory of `name` under each variant."""
    out = {}
    for label, variant in variants.items():
        dtype = variant.pop("dtype", jnp.float32)
        r = runner.run_step(name, args, peaks, dtype, with_torch=False, **variant)
        keys = ("compile_s", "step_s", "examples_per_s", "peak_bytes", "mfu", "mfu_peak")
        out[label] = {k: r[k] for k in keys}
    return out


def search_largest(
    fits: Callable[[int], bool], start: int, cap: int
) -> tuple[int | None, int | None]:
    """`(largest batch that fits, smallest found not to)`: doubling from `start` up to `cap`,
    then bisecting the gap to a quarter of the last fitting batch; `(lo, None)` where nothing up
    to `cap` failed (the search stops there, `lo` is a lower bound). `fits` is called once per
    batch tried."""
    if not fits(start):
        return None, start
    lo, hi = start, None
    while hi is None:
        if 2 * lo > cap:
            return lo, None
        if fits(2 * lo):
            lo *= 2
        else:
            hi = 2 * lo
    grain = max(1, lo // 4)
    while hi - lo > grain:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def _device_memory(args) -> int:
    if args.memory_gib:
        return int(args.memory_gib * 2**30)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise UserError(
            "--ablations max_batch: this device reports no memory limit; give --memory-gib."
        )
    return int(stats["bytes_limit"])


def max_batch_ablation(
    args, variants: dict[str, dict], progress: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Per variant of the CLIP step: the largest batch whose buffer plan fits the device's
    memory and whose step then runs, every batch tried, and the bound found above it."""
    limit = _device_memory(args)
    start = workloads.sizes("clip", args.small, args.batch)["batch"]
    out: dict[str, Any] = {"memory_limit_bytes": limit}
    for label, variant in variants.items():
        tried: dict[str, Any] = {}

        def fits(batch: int, variant=variant, tried=tried, label=label) -> bool:
            sz = workloads.sizes("clip", args.small, batch)
            try:
                built = workloads.build("clip", sz, **variant)
                peak = built.runner.compiled.peak_bytes
                ok = peak is not None and peak <= limit
                if ok:
                    built.runner.step()
            except Exception as e:  # noqa: BLE001 - out of memory, at compile time or at run
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                peak, ok = None, False
            finally:
                built = None
                gc.collect()
            tried[str(batch)] = {"peak_bytes": peak, "fits": ok}
            out[label] = {"largest": None, "smallest_not_fitting": None, "tried": tried}
            if progress:
                progress(out)
            return ok

        largest, above = search_largest(fits, start, cap=16 * start)
        out[label] = {"largest": largest, "smallest_not_fitting": above, "tried": tried,
                      "cap": 16 * start}  # fmt: skip
    return out


def mobilenet_forward(args) -> dict[str, float]:
    """Images/s of ImageNet MobileNetV2 inference (1000 classes) with each depthwise form, and
    of PyTorch eager with `--torch`: batch 64 at 112 px (`--small`: 8 at 32 px, width 0.25)."""
    batch, image, width = (8, 32, 0.25) if args.small else (64, 112, 1.0)
    x = jax.device_put(np.random.default_rng(0).standard_normal((batch, image, image, 3)))
    x = x.astype(jnp.float32)
    calls = {}
    for impl in ("conv", "shift"):
        model = zoo.build("mobilenet_v2", num_classes=1000, width=width, depthwise=impl)
        variables = jax.jit(model.init)(jax.random.key(0), x)
        fwd = jax.jit(lambda v, im, m=model: m.apply(v, im)["logits"])
        compiled = fwd.lower(variables, x).compile()
        calls[f"forward_{impl}_images_per_s"] = lambda c=compiled, v=variables: (
            jax.block_until_ready(c(v, x))
        )
    if args.torch:
        from xmodal_jax.bench import torch_ref

        torch_ref.set_threads(torch_ref.cores())
        calls["forward_torch_eager_images_per_s"] = torch_ref.mobilenet_forward(width, batch, image)
    medians = runner.alternate(calls, max(args.steps // 2, 5), args.rounds)
    out = {k: batch / v for k, v in medians.items()}
    out["forward_batch"], out["forward_image"] = batch, image
    return out


def args_dtype(args) -> Any:
    return jnp.bfloat16 if getattr(args, "dtype", "float32") == "bfloat16" else jnp.float32


def run(name: str, args, peaks: dict, progress: Callable[[dict], None] | None = None) -> dict:
    """Runs the ablation `name` (one of `names.ABLATIONS`); `progress` is handed what is
    measured so far (by `max_batch`, after every batch tried), so a run cut short keeps it."""
    if name == "depthwise":
        return depthwise_ablation(args)
    if name == "max_pool":
        return max_pool_ablation(args)
    if name == "residuals":
        return residuals_ablation(args)
    if name == "conv_forms":
        from xmodal_jax.bench import conv_forms

        return conv_forms.ablation(args, peaks)
    if name == "max_batch":  # the scanned step first: it compiles several times faster
        variants = {
            "scan_remat_dots": {"dtype": args_dtype(args), "scan": True, "remat": "dots"},
            "unrolled": {"dtype": args_dtype(args)},
        }
        return max_batch_ablation(args, variants, progress)
    if name in ("cpu_backends", "malloc"):  # each variant in a process of its own
        from xmodal_jax.bench import backends, malloc

        chosen = tuple(w for w in args.workloads.split(",") if w in backends.WORKLOADS)
        compare = backends.ablation if name == "cpu_backends" else malloc.ablation
        return compare(args, chosen or backends.WORKLOADS)
    variants = {
        "scan_remat": {
            "unrolled": {},
            "scan": {"scan": True},
            "scan_remat_dots": {"scan": True, "remat": "dots"},
            "scan_remat_full": {"scan": True, "remat": "full"},
        },
        "donation": {"donated": {"donate": True}, "not_donated": {"donate": False}},
        "bf16": {"float32": {"dtype": jnp.float32}, "bfloat16": {"dtype": jnp.bfloat16}},
        "fsdp": {
            "one_device_jit": {"dtype": args_dtype(args)},
            "fsdp_path": {"dtype": args_dtype(args), "fsdp": True},
        },
    }[name]
    return variant_ablation("clip", args, peaks, variants)
