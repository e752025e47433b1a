"""`xmodal bench`: the end-to-end small run, the FLOP counter, MFU, the depthwise forms."""

import argparse
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax import main
from xmodal_jax.bench import ablations, cli, measure, profile, workloads
from xmodal_jax.bench.profile import UNTRACED
from xmodal_jax.errors import UserError
from xmodal_jax.models import layers, residuals

STEP_FIELDS = (
    "compile_s",
    "step_s",
    "examples_per_s",
    "flops_per_step",
    "achieved_flops_per_s",
    "mfu",
    "mfu_peak",
    "peak_bytes",
)


# The small run goes in a fresh process: other test modules import torch (their oracle), so
# only there can the test see that the run itself never imports it.
RUN = """
import json, sys
from xmodal_jax import main
results = main.run(["bench", "--small", "--json", sys.argv[1]])
print(json.dumps({"results": results, "torch_imported": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def small_run(tfds_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    r = subprocess.run(
        [sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["results"], json.loads(path.read_text()), out["torch_imported"]


def test_small_run_reports_every_field(small_run, capsys):
    results, written, torch_imported = small_run
    assert written == results
    c = results["ceilings"]
    assert c["matmul_f32_flops"] > 0 and c["matmul_bf16_flops"] > 0 and c["copy_bytes_per_s"] > 0
    import benchmarks.tables as bench_tables

    assert c["matmul_repeats"] == 20 and "(n=512, best of 20), copy" in bench_tables.header(results)
    older = {**results, "ceilings": {k: v for k, v in c.items() if k != "matmul_repeats"}}
    assert "(n=512), copy" in bench_tables.header(older)  # runs before the field: best of 5
    assert set(results["workloads"]) == set(cli.WORKLOADS)
    for name in ("clip", "resnet50", "mnv2_dann"):
        r = results["workloads"][name]
        for field in STEP_FIELDS:
            assert r[field] is not None, (name, field)
        assert r["flops_per_step"] > 0 and r["peak_bytes"] > 0 and r["step_s"] > 0
        assert r["mfu_peak"] == "matmul_f32_flops"
        # MFU is the step's cost-analysis FLOPs over its median time, over the measured peak.
        expect = r["flops_per_step"] / r["step_s"] / c["matmul_f32_flops"]
        assert r["mfu"] == pytest.approx(expect, rel=1e-9)
        assert r["examples_per_s"] == pytest.approx(r["examples_per_step"] / r["step_s"])
    p = results["workloads"]["pipeline"]
    assert p["animals_examples_per_s"] > 0 and p["digits_paired_examples_per_s"] > 0
    for key in ("machine", "command"):
        assert results[key]
    assert not torch_imported  # torch is imported only for --torch


@pytest.mark.slow  # three more MobileNetV2 compiles; the forms' own check is the next test
def test_depthwise_forms_agree_on_train_step_gradients(capsys):
    results = main.run(["bench", "--small", "--workloads", "mnv2_dann", "--ablations", "depthwise"])
    d = results["ablations"]["depthwise"]
    # First-step parameter updates of the MobileNetV2 + DANN step are -lr x gradient (SGD).
    assert d["grad_max_abs_diff_rel"] < 1e-4
    assert d["grad_shift_vjp_vs_shift_max_abs_diff_rel"] < 1e-4
    for key in ("train_step_conv_s", "train_step_shift_s", "forward_conv_images_per_s"):
        assert d[key] > 0
    ratio = d["train_step_shift_alternated_s"] / d["train_step_shift_vjp_alternated_s"]
    assert d["speed_shift_vjp_vs_shift"] == pytest.approx(ratio)


@pytest.mark.slow  # eight small processes; the mechanism's own check is tests/test_residuals.py
def test_residuals_ablation_compares_the_two_settings_in_processes(capsys):
    import benchmarks.tables as bench_tables

    argv = ["bench", "--small", "--workloads", "clip,resnet50", "--ablations", "residuals"]
    results = main.run([*argv, "--steps", "2", "--rounds", "2"])
    r = results["ablations"]["residuals"]
    assert r["settings"]["stored"] == "XMODAL_CPU_RESIDUALS=stored"
    for workload in ("clip", "resnet50"):
        fused, stored = r[workload]["fused"], r[workload]["stored"]
        assert fused["fused_instructions"] > stored["fused_instructions"] > 0
        assert fused["update_max_abs_diff_rel"] == 0.0  # the reference against itself
        assert stored["speed_vs_default"] == pytest.approx(fused["step_s"] / stored["step_s"])
    assert r["resnet50"]["stored"]["update_max_abs_diff_rel"] < 1e-5  # SGD: -lr x gradient
    assert results["machine"]["cpu_residuals"] == "stored"
    table = "\n".join(bench_tables.residuals(r))
    assert "| resnet50 | stored (`XMODAL_CPU_RESIDUALS=stored`) |" in table


def _numpy_depthwise(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """Direct loop over output pixels: the definition of a padded depthwise convolution."""
    k = kernel.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    b, h, w, c = x.shape
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    out = np.zeros((b, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            win = xp[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j] = np.einsum("bklc,klc->bc", win, kernel[:, :, 0, :])
    return out


def _numpy_depthwise_grads(x, kernel, dy, stride):
    """The input and kernel gradients of `_numpy_depthwise` for the output gradient `dy`, by
    the same loop: each output pixel's gradient times its window."""
    k = kernel.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    dxp, dk = np.zeros_like(xp), np.zeros_like(kernel)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            rows, cols = slice(i * stride, i * stride + k), slice(j * stride, j * stride + k)
            g = dy[:, i, j]  # [b, c]
            dxp[:, rows, cols] += g[:, None, None, :] * kernel[None, :, :, 0, :]
            dk[:, :, 0] += np.einsum("bklc,bc->klc", xp[:, rows, cols], g)
    return dxp[:, p : p + x.shape[1], p : p + x.shape[2]], dk


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_forms_match_reference_forward_and_backward(stride):
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((2, 7, 6, 5)).astype(np.float32)
    impls = ("conv", "shift", "shift_vjp")
    mods = {impl: layers.DepthwiseConv(3, stride, impl) for impl in impls}
    variables = nn.unbox(jax.jit(mods["conv"].init)(jax.random.key(0), x))
    kernel = np.asarray(variables["params"]["kernel"])
    ref = _numpy_depthwise(x.astype(np.float64), kernel.astype(np.float64), stride)
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    ref_dx, ref_dk = _numpy_depthwise_grads(
        x.astype(np.float64), kernel.astype(np.float64), dy.astype(np.float64), stride
    )
    grads = {}
    for impl, mod in mods.items():
        y = jax.jit(mod.apply)(variables, x)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        loss = lambda v, im, m=mod: jnp.sum(jnp.sin(m.apply(v, im)))
        grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
        dk, dx = jax.jit(lambda v, im, m=mod: jax.vjp(m.apply, v, im)[1](dy))(variables, x)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dk["params"]["kernel"], ref_dk, rtol=1e-5, atol=1e-5)
    assert ablations.max_rel_diff(grads["conv"], grads["shift"]) < 1e-5
    assert ablations.max_rel_diff(grads["shift"], grads["shift_vjp"]) < 1e-5
    # EfficientNet-Lite's depthwise layers pad outside (padding=0): the flipped form pads dy more
    unpadded = {impl: layers.DepthwiseConv(3, stride, impl, padding=0) for impl in impls[1:]}
    loss = lambda v, im, m: jnp.sum(jnp.sin(m.apply(v, im)))  # noqa: E731
    g = {i: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(variables, x, m)
         for i, m in unpadded.items()}  # fmt: skip
    assert g["shift"][1].shape == x.shape
    assert ablations.max_rel_diff(g["shift"], g["shift_vjp"]) < 1e-5


def test_auto_depthwise_on_cpu_is_shift_vjp_unless_the_environment_says_shift(monkeypatch):
    x = np.zeros((2, 7, 6, 5), np.float32)
    variables = nn.unbox(jax.jit(layers.DepthwiseConv(3).init)(jax.random.key(0), x))

    def program(impl: str) -> str:  # traced afresh: the form is chosen when tracing
        return str(jax.make_jaxpr(layers.DepthwiseConv(3, 1, impl).apply)(variables, x))

    monkeypatch.delenv(layers.CPU_DEPTHWISE_ENV, raising=False)
    assert layers.depthwise_impl("auto") == "shift_vjp"
    assert "custom_vjp_call" in program("shift_vjp") and "custom_vjp_call" not in program("shift")
    assert program("auto") == program("shift_vjp")
    monkeypatch.setenv(layers.CPU_DEPTHWISE_ENV, "shift")  # as the runs recorded before it
    assert program("auto") == program("shift")
    monkeypatch.setenv(layers.CPU_DEPTHWISE_ENV, "conv")
    with pytest.raises(UserError, match="XMODAL_CPU_DEPTHWISE='conv'.*unset it"):
        layers.depthwise_impl("auto")


@pytest.mark.parametrize("m,k,n", [(64, 32, 48), (128, 256, 8)])
def test_flop_counter_matches_hand_count_for_a_matmul_step(m, k, n):
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    compiled = measure.compile_jit(jax.jit(jnp.matmul), a, b)
    assert compiled.flops == 2 * m * n * k
    assert compiled.peak_bytes >= 4 * (m * k + k * n + m * n)


def test_mfu_arithmetic():
    assert measure.mfu(25e9, 100e9) == pytest.approx(0.25)
    assert measure.mfu(None, 100e9) is None and measure.mfu(1e9, None) is None
    with pytest.raises(UserError):
        measure.mfu(-1.0, 100e9)


def test_unknown_workload_is_one_clear_error(capsys):
    with pytest.raises(UserError, match=r"Unknown workloads \['vit_b16'\].*clip, resnet50"):
        main.run(["bench", "--small", "--workloads", "vit_b16"])
    assert main.main(["bench", "--workloads", "clip,nope"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_a_backend_flag_is_added_to_the_users_own_xla_flags(monkeypatch):
    from xmodal_jax.bench import backends

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    env = backends.env_for("xnnpack")
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_use_xnnpack=true"
    assert backends.env_for("default")["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.delenv("XLA_FLAGS")
    assert backends.env_for("onednn")["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"


def test_compared_variants_take_turns_at_running_first(monkeypatch, tmp_path):
    """Round r starts with the r-th variant; every variant's update is saved in the first round,
    and the figures are the median of every round's steps."""
    import argparse

    import benchmarks.tables as bench_tables
    from xmodal_jax.bench import backends

    calls = []

    def child(env, workload, args, updates):
        calls.append((workload, env["V"]))
        if updates:
            np.savez(updates, w=np.float32([1.0, 2.0 if env["V"] == "c" else 1.0]))
        return {"step_s": [0.1 * len(calls)], "compile_s": 1.0, "max_rss_mib": 10.0}

    monkeypatch.setattr(backends, "run_child", child)
    envs = {v: {"V": v} for v in ("a", "b", "c")}
    out = backends.compare(envs, argparse.Namespace(rounds=4), ("w1", "w2"))
    assert out["rotated"] and "each round starting with the next" in bench_tables._turns(out, "x")
    firsts = [calls[i][1] for i in range(0, len(calls), 3)]
    assert firsts == ["a", "a", "b", "b", "c", "c", "a", "a"]
    assert [v for w, v in calls[:6]] == ["a", "b", "c", "a", "b", "c"]
    assert [v for w, v in calls[6:9]] == ["b", "c", "a"]
    steps_a = [0.1 * (i + 1) for i, (w, v) in enumerate(calls) if (w, v) == ("w1", "a")]
    assert out["w1"]["a"]["step_s"] == pytest.approx(np.median(steps_a))
    assert out["w1"]["c"]["update_max_abs_diff_rel"] == 1.0  # |2 - 1| over the largest |1|
    assert out["w1"]["b"]["speed_vs_default"] == pytest.approx(
        out["w1"]["a"]["step_s"] / out["w1"]["b"]["step_s"]
    )


@pytest.mark.slow
def test_cpu_backends_ablation_runs_each_backend_and_compares_first_updates():
    """Each backend in its own process (the small ResNet-50 step): every one runs, and its first
    parameter update is the default backend's to float32 rounding."""
    import argparse

    from xmodal_jax.bench import backends

    args = argparse.Namespace(small=True, batch=None, steps=2, rounds=1)
    out = backends.ablation(args, workloads=("resnet50",))
    row = out["resnet50"]
    assert set(row) == set(backends.BACKENDS)
    for name, cell in row.items():
        assert "error" not in cell, (name, cell)
        assert cell["step_s"] > 0 and 0 <= cell["update_max_abs_diff_rel"] < 1e-4, (name, cell)
    assert row["default"]["update_max_abs_diff_rel"] == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_childs_peak_memory_is_its_own_not_its_large_parents():
    """getrusage's peak survives fork and exec: a child of a 512 MiB parent would report at
    least that. The child's peak (`backends._peak_rss_mib`) is its own."""
    big = np.ones(2**27, np.float32)  # 512 MiB, touched
    code = "from xmodal_jax.bench import backends; print(backends._peak_rss_mib())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0 < float(done.stdout) < 256, done.stdout
    del big


@pytest.mark.slow
def test_malloc_ablation_runs_with_and_without_huge_pages_and_changes_no_number():
    """The small LeNet + DANN step in a process with glibc's defaults and in one with the
    `xmodal` setting: both run, the setting reaches the second only, and the first update is
    the same bit for bit (where memory comes from changes no arithmetic)."""
    import benchmarks.tables as bench_tables
    from xmodal_jax import malloc_defaults
    from xmodal_jax.bench import malloc

    args = argparse.Namespace(small=True, batch=None, steps=2, rounds=1)
    out = malloc.ablation(args, workloads=("lenet_dann",))
    assert out["tunables"]["hugetlb"].endswith(malloc_defaults.SETTING)
    assert malloc_defaults.TUNABLE not in out["tunables"]["default"]
    row = out["lenet_dann"]
    for name, cell in row.items():
        assert "error" not in cell, (name, cell)
        assert cell["step_s"] > 0 and cell["max_rss_mib"] > 0, (name, cell)
    assert row["hugetlb"]["update_max_abs_diff_rel"] == 0.0
    assert "| lenet_dann | hugetlb (`" in bench_tables.ablations({"ablations": {"malloc": out}})


def test_peak_memory_counts_the_activations():
    """A chain of element-wise steps over a batch keeps intermediates alive for the backward
    pass: the step's peak grows with the batch by at least the saved activations (float32,
    `width` features per example and layer), counted by hand."""
    width, depth = 256, 4

    def loss(w, x):
        for _ in range(depth):
            x = jnp.tanh(x @ w)
        return jnp.sum(x)

    grad = jax.jit(jax.grad(loss))
    w = jnp.ones((width, width)) / width
    peaks = {b: measure.compile_jit(grad, w, jnp.ones((b, width))).peak_bytes for b in (8, 512)}
    saved = depth * (512 - 8) * width * 4  # tanh outputs kept for the backward pass
    assert peaks[512] - peaks[8] >= saved


def test_layer_stack_and_depthwise_flags_and_profile_of_the_scanned_remat_step(
    tfds_dir, small_run, capsys
):
    import benchmarks.tables as bench_tables
    from xmodal_jax import provenance

    argv = ["--small", "--workloads", "clip,mnv2_dann", "--scan", "--remat", "dots", "--steps", "1"]
    out = cli.run([*argv, "--profile", "--depthwise", "shift_vjp"])
    clip = out["workloads"]["clip"]
    assert clip["variant"] == {"scan": True, "remat": "dots"} and clip["step_s"] > 0
    # The scanned step's FLOPs are the unrolled program's (XLA counts a loop body once): at
    # least the unrolled step's compiled count (small_run, no remat), remat's recomputation on top
    unrolled = small_run[0]["workloads"]["clip"]["flops_per_step"]
    assert clip["flops_source"] == "unrolled"
    assert 0.95 * unrolled <= clip["flops_per_step"] <= 1.5 * unrolled
    assert small_run[0]["workloads"]["clip"]["flops_source"] == "compiled"
    assert "| clip (scan, remat dots) | 4 |" in bench_tables.steps(out)
    assert "† FLOPs of the same step with its layer stacks unrolled" in bench_tables.steps(out)
    older = {k: v for k, v in clip.items() if k != "flops_source"}  # records before the field
    assert "‡ XLA's count" in bench_tables.steps({**out, "workloads": {"clip": older}})
    # --depthwise picks MobileNetV2's form, and the step table names it
    assert out["workloads"]["mnv2_dann"]["variant"] == {"depthwise": "shift_vjp"}
    assert "| mnv2_dann (depthwise shift_vjp) | 8 |" in bench_tables.steps(out)
    # the profile: ops by time, their shares of the ops' time, and the same summed by kind
    ops, kinds = clip["profile"]["top_ops"], clip["profile"]["by_kind"]
    assert ops and [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    assert all(0 < o["share"] <= 1 and (o["calls"] >= 1 or o["name"] == UNTRACED) for o in ops)
    assert sum(k["share"] for k in kinds) == pytest.approx(1.0, abs=1e-6) or len(kinds) == 15
    profiled = clip["profile"]  # on a CPU: shares of the traced steps' wall time x cores
    assert profiled["wall_ms"] > 0 and profiled["cores"] >= 1
    assert any(k["name"] in ("dot", "ynn_fusion", "fusion") for k in kinds)
    assert "**clip: op kinds with the most time**" in bench_tables.profiles(out)
    # the run line names the processor's vector extension (runs before the field: none)
    m = out["machine"]
    assert "cpu_simd" in m
    simd = {**out, "machine": {**m, "cpu_simd": "AVX-512", "cpu_family": ""}}
    assert f"{m['cpu']}, AVX-512, {m['cores']} cores" in bench_tables.header(simd)
    older = {**out, "machine": {k: v for k, v in m.items() if k not in ("cpu_simd", "cpu_family")}}
    assert f"{m['cpu']}, {m['cores']} cores" in bench_tables.header(older)
    # and, on x86, the family and model behind a generic name (runs before the field: none)
    assert m["cpu_family"] == provenance.cpu_family()
    family = {**out, "machine": {**m, "cpu_simd": "AVX-512", "cpu_family": "family 26, model 2"}}
    want = f"{m['cpu']} (family 26, model 2), AVX-512, {m['cores']} cores"
    assert want in bench_tables.header(family)
    # and what depthwise='auto' ran on CPU (runs before the field: `shift`, not named)
    assert m["cpu_depthwise"] == layers.cpu_depthwise()
    assert "convolutions on CPU, shift_vjp depthwise, " in bench_tables.header(
        {**out, "machine": {**m, "cpu_depthwise": "shift_vjp"}}
    )
    before = {k: v for k, v in m.items() if k != "cpu_depthwise"}
    assert " depthwise, " not in bench_tables.header({**out, "machine": before})
    # and how residual streams were fused on CPU (runs before the field: `fused`, not named)
    assert m["cpu_residuals"] == residuals.cpu_residuals()
    assert "shift_vjp depthwise, stored residuals, " in bench_tables.header(
        {**out, "machine": {**m, "cpu_depthwise": "shift_vjp", "cpu_residuals": "stored"}}
    )
    before = {k: v for k, v in m.items() if k != "cpu_residuals"}
    assert " residuals, " not in bench_tables.header({**out, "machine": before})
    assert "| clip (scan, remat dots) | 4 |" in bench_tables.steps(out)
    plain = {**out, "workloads": {"clip": {k: v for k, v in clip.items() if k != "variant"}}}
    assert "| clip | 4 |" in bench_tables.steps(plain)


def test_an_unknown_depthwise_form_is_refused_before_anything_runs():
    with pytest.raises(SystemExit):  # argparse names the choices
        cli.run(["--small", "--workloads", "mnv2_dann", "--depthwise", "grouped"])


def test_alternation_times_no_step_that_directly_follows_another_runners(monkeypatch):
    """The step after a switch of runners pays for the other runner's state; `alternate` runs
    it untimed, so every timed step follows one of its own runner's."""
    from xmodal_jax.bench import runner

    log: list[str] = []

    def timed(call, n):  # 1.0 for a step after its own runner's, 100.0 after the other's
        out = []
        for _ in range(n):
            after_own = bool(log) and log[-1] == call.__name__
            call()
            out.append(1.0 if after_own else 100.0)
        return out

    def ours():
        log.append("ours")

    def theirs():
        log.append("theirs")

    monkeypatch.setattr(runner.measure, "time_calls", timed)
    medians = runner.alternate({"ours": ours, "theirs": theirs}, steps=4, rounds=4)
    assert medians == {"ours": 1.0, "theirs": 1.0}
    assert log.count("ours") == runner.WARMUP + 4 + 4  # warm-up, a step per switch, timed


def test_a_cpu_profile_shows_the_cores_time_no_traced_op_covers(tmp_path):
    """XLA:CPU's convolutions run as Eigen tasks without trace events: a CPU profile's shares are
    of the wall time x cores, with the rest as a row of its own (and by kind); an accelerator's
    stay shares of its ops' time."""
    import gzip

    def write(events, threads, name):
        meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": name}}]
        meta += [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": n}}
                 for t, n in threads.items()]  # fmt: skip
        path = tmp_path / f"{name.strip('/:')}.json.gz"
        with gzip.open(path, "wt") as f:
            json.dump({"traceEvents": meta + events}, f)
        return str(path)

    ev = lambda tid, op, us: {"ph": "X", "pid": 1, "tid": tid, "name": op, "ts": 0, "dur": us}
    events = [ev(1, "transpose_copy_fusion.3", 300.0), ev(2, "transpose_copy_fusion.7", 100.0),
              ev(2, "convolution.1", 100.0), ev(1, "ThunkExecutor::Execute (wait)", 900.0),
              ev(3, "$python_side", 5000.0)]  # fmt: skip
    threads = {1: "tf_XLAPjRtCpuClient/1", 2: "tf_XLAEigen/2", 3: "python"}
    cpu = write(events, threads, "/host:CPU")
    ops = profile.top_ops(cpu, None, cpu_capacity_ms=2.0)  # e.g. 1 ms wall x 2 cores
    assert [(o["name"], o["ms"], o["calls"]) for o in ops] == [
        (UNTRACED, 1.5, 0), ("transpose_copy_fusion.3", 0.3, 1),
        ("transpose_copy_fusion.7", 0.1, 1), ("convolution.1", 0.1, 1)]  # fmt: skip
    assert [o["share"] for o in ops] == pytest.approx([0.75, 0.15, 0.05, 0.05])
    kinds = profile.by_kind(ops)
    assert [(k["name"], k["share"]) for k in kinds] == [
        (UNTRACED, pytest.approx(0.75)), ("transpose_copy_fusion", pytest.approx(0.2)),
        ("convolution", pytest.approx(0.05))]  # fmt: skip
    # ops that add up to more than the capacity (threads beyond the cores): no row, op shares
    over = profile.top_ops(cpu, None, cpu_capacity_ms=0.25)
    assert UNTRACED not in [o["name"] for o in over]
    assert sum(o["share"] for o in over) == pytest.approx(1.0)
    # without a capacity (the older records), and on an accelerator: shares of the ops' time
    assert [o["share"] for o in profile.top_ops(cpu)] == pytest.approx([0.6, 0.2, 0.2])
    gpu = write([ev(1, "fusion.1", 30.0), ev(1, "gemm.2", 10.0)], {1: "stream 7"}, "/device:GPU:0")
    assert [o["share"] for o in profile.top_ops(gpu, None, 1.0)] == pytest.approx([0.75, 0.25])
    # a device's program, step and kernel lines repeat its ops: only "XLA Ops" counts
    lines = {1: "XLA Modules", 2: "XLA Ops", 3: "Stream #13(Compute)", 4: "Steps"}
    events = [ev(1, "jit_step(123)", 50.0), ev(2, "fusion.1", 30.0), ev(2, "gemm.2", 10.0),
              ev(3, "sm90_xmma_gemm_bf16", 9.0), ev(3, "loop_fusion_kernel", 29.0),
              ev(4, "0", 50.0)]  # fmt: skip
    ops = profile.top_ops(write(events, lines, "/device:GPU:1"), None)
    assert [(o["name"], o["share"]) for o in ops] == [
        ("fusion.1", pytest.approx(0.75)), ("gemm.2", pytest.approx(0.25))]  # fmt: skip
    # without an ops line: the kernels, not the program or step spans
    del lines[2]
    events = [e for e in events if e["tid"] != 2]
    kernels = [o["name"] for o in profile.top_ops(write(events, lines, "/device:GPU:2"), None)]
    assert kernels == ["loop_fusion_kernel", "sm90_xmma_gemm_bf16"]


def _numpy_conv_forward_backward(x, w, dy):
    """Float64 loops over the kernel's taps: a 'SAME' stride-1 convolution, and the gradients of
    sum(y * dy) with respect to its input and kernel."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    _, h, wd, _ = x.shape
    y, gw, gxp = np.zeros(dy.shape), np.zeros(w.shape), np.zeros(xp.shape)
    for i in range(k):
        for j in range(k):
            win = xp[:, i : i + h, j : j + wd, :]
            y += np.einsum("bhwc,co->bhwo", win, w[i, j])
            gw[i, j] = np.einsum("bhwc,bhwo->co", win, dy)
            gxp[:, i : i + h, j : j + wd, :] += np.einsum("bhwo,co->bhwc", dy, w[i, j])
    return y, gxp[:, p:-p, p:-p, :], gw


def test_conv_forms_compute_the_convolution_and_its_gradients():
    """The three convolution forms of the `conv_forms` ablation against float64 loops; `gemm`
    is a product of the same size, not a convolution."""
    from xmodal_jax.bench import conv_forms

    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s) for s in ((2, 5, 6, 3), (3, 3, 3, 4), (2, 5, 6, 4)))
    want = _numpy_conv_forward_backward(x, w, dy)
    for name in conv_forms.CONVOLUTIONS:
        got = conv_forms._forward_backward(conv_forms.FORMS[name], jnp.asarray(dy, jnp.float32))(
            jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
        )
        for g, r in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-4, err_msg=name)
    y = conv_forms.gemm(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert y.shape == want[0].shape and not np.allclose(np.asarray(y), want[0], atol=1e-2)


def test_conv_forms_ablation_times_each_form_per_shape(capsys):
    import benchmarks.tables as bench_tables

    results = main.run(["bench", "--small", "--workloads", "lenet_dann", "--steps", "2",
                        "--rounds", "2", "--ablations", "conv_forms"])  # fmt: skip
    a = results["ablations"]["conv_forms"]
    assert a["batch"] == 4 and set(a) == {"batch", "8x8x8", "4x4x16"}
    for shape in ("8x8x8", "4x4x16"):
        assert list(a[shape]) == ["xla", "nchw", "im2col", "gemm"]
        for form, v in a[shape].items():
            assert v["ms"] > 0 and v["gflops"] > 0 and v["of_matmul_peak"] > 0
            assert ("max_rel_diff_vs_xla" in v) == (form in ("nchw", "im2col"))
            assert v.get("max_rel_diff_vs_xla", 0.0) < 1e-5
    md = bench_tables.ablations(results)
    assert "**conv_forms**" in md and "| 4x4x16 | im2col |" in md


@pytest.mark.parametrize("threshold", [1, 3, 4, 5, 7, 8, 100, 129, 256, 1000])
def test_largest_batch_search_agrees_with_trying_every_batch(threshold):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= threshold

    largest, above = ablations.search_largest(fits, start=4, cap=256)
    if threshold < 4:
        assert (largest, above) == (None, 4)
        return
    if threshold >= 256:  # nothing above the cap is tried
        assert (largest, above) == (256, None) and max(calls) == 256
        return
    assert largest is not None and largest <= threshold < above
    assert above - largest <= max(1, largest // 4)
    assert len(set(calls)) == len(calls)  # each batch tried once


def test_implausible_compiled_flops_fall_back_to_the_lowered_count():
    assert measure.plausible_flops(1.0e9, 0.98e9) == (1.0e9, "compiled")
    assert measure.plausible_flops(0.9e9, None) == (0.9e9, "compiled")
    assert measure.plausible_flops(511.0, 74752.0) == (74752.0, "lowered")  # jax-ml/jax#22249
    assert measure.plausible_flops(None, 2.0e6) == (2.0e6, "lowered")
    assert measure.plausible_flops(None, None) == (None, "none")


def test_max_batch_table_names_a_search_that_stopped_at_its_cap():
    import benchmarks.tables as bench_tables

    tried = {"4": {"peak_bytes": 2**20, "fits": True}, "8": {"peak_bytes": 2**21, "fits": True}}
    capped = {"largest": 8, "smallest_not_fitting": None, "tried": tried, "cap": 8}
    found = {"largest": 4, "smallest_not_fitting": 5, "tried": tried, "cap": 64}
    running = {"largest": None, "smallest_not_fitting": None, "tried": tried}
    rows = bench_tables.max_batch(
        {"memory_limit_bytes": 2**30, "a": capped, "b": found, "c": running}
    )
    assert "| a | ≥ 8 | none up to the cap, 8 | 4 (1.0, yes), 8 (2.0, yes) |" in rows
    assert any(r.startswith("| b | 4 | 5 |") for r in rows)
    assert any(r.startswith("| c | not finished | not finished |") for r in rows)


@pytest.mark.slow  # a dozen small CLIP compiles
def test_fsdp_and_max_batch_ablations_at_small_size(tfds_dir, capsys):
    import benchmarks.tables as bench_tables

    argv = ["--small", "--workloads", "clip", "--ablations", "fsdp,max_batch", "--steps", "1"]
    out = cli.run([*argv, "--batch", "8", "--memory-gib", "0.03"])
    fsdp = out["ablations"]["fsdp"]
    assert fsdp["fsdp_path"]["step_s"] > 0 and fsdp["one_device_jit"]["step_s"] > 0
    for label in ("unrolled", "scan_remat_dots"):
        m = out["ablations"]["max_batch"][label]
        tried = {int(b): t for b, t in m["tried"].items()}
        assert tried[m["largest"]]["fits"] and not tried[m["smallest_not_fitting"]]["fits"]
        peaks = [tried[b]["peak_bytes"] for b in sorted(tried)]
        assert peaks == sorted(peaks)  # the plan grows with the batch
        assert all(t["fits"] == (t["peak_bytes"] <= 0.03 * 2**30) for t in tried.values())
    assert "| unrolled |" in bench_tables.ablations(out)


@pytest.mark.slow  # two small CLIP compiles
def test_the_sharded_path_counts_the_plain_steps_flops():
    """The `fsdp` ablation's step reads XLA's FLOP count as the plain step does, with the same
    fallback to the lowered program's (a device's share of it) where the compiled one is off."""
    sz = workloads.sizes("clip", True)
    plain = workloads.build("clip", sz).runner.compiled
    sharded = workloads.build("clip", sz, fsdp=True).runner.compiled
    assert (plain.flops_source, sharded.flops_source) == ("compiled", "compiled")
    assert sharded.flops == pytest.approx(plain.flops, rel=0.05)


def test_max_pool_ablation_same_update_both_forms():
    args = argparse.Namespace(small=True, batch=None, steps=2, rounds=1, workloads="clip")
    a = ablations.max_pool_ablation(args)  # no pooled workload named: LeNet + DANN's
    assert a["update_max_abs_diff_rel"] == 0.0  # the same gradient, bit for bit
    assert a["train_step_reduce_window_s"] > 0 and a["train_step_tiled_s"] > 0
    ratio = a["train_step_reduce_window_s"] / a["train_step_tiled_s"]
    assert a["speed_tiled_vs_reduce_window"] == pytest.approx(ratio)
    assert not any(k.startswith("resnet50_") for k in a)
    # ResNet-50's stem pool, where named (its BatchNorms: first updates equal or within rounding)
    r = ablations.max_pool_ablation(argparse.Namespace(**{**vars(args), "workloads": "resnet50"}))
    assert "train_step_tiled_s" not in r and r["resnet50_batch"] == 4
    assert r["resnet50_update_max_abs_diff_rel"] < 1e-5
    ratio = r["resnet50_train_step_reduce_window_s"] / r["resnet50_train_step_strided_s"]
    assert r["resnet50_speed_strided_vs_reduce_window"] == pytest.approx(ratio)


def test_a_timed_test_run_records_its_processor_and_compilation_cache(tmp_path):
    """`--timing-record` notes the processor's vector extension and how many compiled programs
    the run found cached (a cold cache can triple a tier's time); the README line says both."""
    import os
    import platform

    import benchmarks.tables as bench_tables
    from xmodal_jax import provenance

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache, record = tmp_path / "jax_cache", tmp_path / "timing.json"
    cache.mkdir()
    for name in ("a", "b"):
        (cache / name).write_text("")
    test = "tests/test_regression.py::test_a_rerun_gets_its_records_convolution_setting"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # a run of
    # its own, not an xdist worker (whose record the controller writes)
    env |= {"JAX_COMPILATION_CACHE_DIR": str(cache), "XMODAL_TEST_DEVICES": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test,
         f"--timing-record={record}"], cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    rec = json.loads(record.read_text())
    assert rec["passed"] == 1 and rec["compilation_cache_entries"] == 2
    assert rec["cpu_simd"] == provenance.cpu_simd()
    line = bench_tables.test_run(rec)
    assert "2 programs in the compilation cache at the start" in line
    assert f"python {platform.python_version()}, jax {jax.__version__}, " in line
    assert rec["cpu_family"] == provenance.cpu_family()
    named = bench_tables.test_run({**rec, "cpu_family": "family 26, model 2"})
    assert f"{rec['cpu']} (family 26, model 2) {rec['cpu_simd']}, " in named
    assert f"{rec['cpu']} {rec['cpu_simd']}, " in bench_tables.test_run({**rec, "cpu_family": ""})
    cold = {**rec, "compilation_cache_entries": 0}
    assert "cold compilation cache" in bench_tables.test_run(cold)
    older = {k: v for k, v in rec.items() if k not in ("cpu_simd", "compilation_cache_entries")}
    assert "compilation cache" not in bench_tables.test_run(older)


def test_torch_text_tower_compiles_as_one_graph_with_the_same_output():
    torch = pytest.importorskip("torch")
    from xmodal_jax.bench import torch_ref, workloads

    sz = workloads.sizes("clip", small=True)
    torch.manual_seed(0)
    tower = torch_ref.CLIPText(sz)
    ids = torch.randint(1, sz["vocab"], (2, sz["context"]))
    explained = torch._dynamo.explain(tower)(ids)  # traced only, no inductor compile
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        x = tower.tok(ids) + tower.pos[: ids.shape[1]]
        detected = tower.encoder(x, mask=tower.mask)  # causality read from the mask's values
        hinted = tower.encoder(x, mask=tower.mask, is_causal=True)
    torch.testing.assert_close(hinted, detected, rtol=0, atol=1e-6)


def test_torch_references_run_where_jax_runs_or_say_why_not(monkeypatch):
    torch = pytest.importorskip("torch")
    from xmodal_jax.bench import torch_ref, workloads

    assert torch_ref.device_for("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="JAX runs on 'gpu' but this PyTorch cannot"):
        torch_ref.device_for("gpu")  # not the host CPU in its place
    ref = torch_ref.Runner("lenet_dann", workloads.sizes("lenet_dann", small=True), False)
    ref.step()
    assert ref.device.type == "cpu"
