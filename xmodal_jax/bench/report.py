"""Readable tables of `xmodal bench` results on stdout."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def _gb(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**30:.3f} GiB"


def print_ceilings(results: dict) -> None:
    m, c = results["machine"], results["ceilings"]
    print(f"== {results['command']}")
    print(
        f"machine: {m['cpu']} | {m['cores']} cores | {m['backend']} ({m['device']}) | "
        f"jax {m['jax']} | {m['date']} | load avg {m['loadavg_1_5_15']}"
    )
    print(
        f"ceilings: matmul f32 {c['matmul_f32_flops'] / 1e9:.1f} GFLOP/s, bf16 "
        f"{c['matmul_bf16_flops'] / 1e9:.1f} GFLOP/s (n={c['matmul_n']}); copy "
        f"{c['copy_bytes_per_s'] / 1e9:.2f} GB/s ({c['copy_bytes'] >> 20} MiB)"
    )


def print_workload(name: str, r: dict) -> None:
    if name == "pipeline":
        print(
            f"[pipeline] batch {r['batch']}: animals {r['animals_examples_per_s']:.0f} ex/s, "
            f"digits (source+target) {r['digits_paired_examples_per_s']:.0f} ex/s"
        )
        return
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['mfu_peak']}"
    flops = r["achieved_flops_per_s"]
    print(
        f"[{name}] {r['dtype']} batch {r['examples_per_step']}: compile {r['compile_s']:.1f} s | "
        f"step {1e3 * r['step_s']:.1f} ms | {r['examples_per_s']:.1f} ex/s | "
        f"{_fmt(r['flops_per_step'])} FLOP/step | "
        f"{'n/a' if flops is None else f'{flops / 1e9:.1f} GFLOP/s'} | MFU {mfu} | "
        f"peak mem {_gb(r['peak_bytes'])}"
    )
    for kind in ("torch_eager", "torch_compile"):
        if kind not in r:
            continue
        t = r[kind]
        if "error" in t:
            print(f"    {kind}: failed: {t['error']}")
            continue
        print(
            f"    {kind}: first step {t['compile_s']:.1f} s | step {1e3 * t['step_s']:.1f} ms | "
            f"{t['examples_per_s']:.1f} ex/s | speed ours / {kind}: {t['speedup']:.2f} "
            f"({'ours faster' if t['speedup'] > 1 else 'ours slower'})"
        )


def print_ablation(name: str, r: dict) -> None:
    print(f"[ablation {name}]")
    for k, v in r.items():
        if isinstance(v, dict) and v and all(isinstance(vv, dict) for vv in v.values()):
            print(f"    {k}:")
            for kk, vv in v.items():
                print(f"      {kk}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in vv.items()))
        elif isinstance(v, dict):
            cells = ", ".join(
                f"{kk} {_gb(vv) if kk == 'peak_bytes' else _fmt(vv)}" for kk, vv in v.items()
            )
            print(f"    {k}: {cells}")
        else:
            print(f"    {k}: {_fmt(v)}")
