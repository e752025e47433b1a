"""Markdown tables of `xmodal bench --json` results (BENCHMARKS.md), of test-run timing
records (`pytest --timing-record`, tests/conftest.py; the README's figure for `make test-slow`)
of the towers' parameter counts (`benchmarks/tower_params.py`; the README's table) and of the
step's peak memory two ways (`benchmarks/memory_check.py`).

    .venv/bin/python benchmarks/tables.py benchmarks/results/*.json          # print them
    .venv/bin/python benchmarks/tables.py --write benchmarks/results/*.json  # NAME.md beside each

`--write` (run by `make tables`) writes each run's step and ablation tables to `NAME.md` beside
its JSON; BENCHMARKS.md embeds those files between `<!-- table: ... -->` markers, so no figure in
a table there is typed by hand (tests/test_committed_tables.py checks both steps).
"""

from __future__ import annotations

import json
import sys


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{1e3 * s:,.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def header(r: dict) -> str:
    m, c = r["machine"], r["ceilings"]
    # Runs before the field took the best of 5 products.
    best = f", best of {c['matmul_repeats']}" if "matmul_repeats" in c else ""
    return (
        f"`{r['command']}` — {m['date']}, {m['cpu']}"
        + (f" ({m['cpu_family']})" if m.get("cpu_family") else "")  # runs since the field
        + ", "
        + (f"{m['cpu_simd']}, " if m.get("cpu_simd") else "")  # runs since the field
        + f"{m['cores']} cores, jax {m['jax']}, "
        # Runs before the field ran with XLA's default: YNNPACK's convolutions on CPU.
        f"{m.get('cpu_convolutions', 'ynnpack')} convolutions on CPU, "
        # Runs before the field ran `shift` where a depthwise layer asked for 'auto'.
        + (f"{m['cpu_depthwise']} depthwise, " if m.get("cpu_depthwise") else "")
        # Runs before the fields ran `fused` (`models/residuals.py`); `cpu_cotangent` runs stored
        # the transformer blocks' gradients only.
        + (f"{m['cpu_cotangent']} cotangents, " if m.get("cpu_cotangent") else "")
        + (f"{m['cpu_residuals']} residuals, " if m.get("cpu_residuals") else "")
        # Runs before the field, or outside the `xmodal` program: glibc's allocator defaults.
        + (f"glibc tunables `{m['glibc_tunables']}`, " if m.get("glibc_tunables") else "")
        + "load average "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_1_5_15'])} (1/5/15 min) at the start. "
        f"Ceilings measured in this run: matmul float32 {c['matmul_f32_flops'] / 1e9:.1f} "
        f"GFLOP/s, bfloat16 {c['matmul_bf16_flops'] / 1e9:.1f} GFLOP/s (n={c['matmul_n']}"
        + best
        + "), "
        f"copy {c['copy_bytes_per_s'] / 1e9:.2f} GB/s."
    )


# Where a step's FLOPs come from (`flops_source`), where not from XLA's count of the compiled step.
FLOPS_MARKS = {
    "loop_once": ("‡", "XLA's count of the compiled scanned step, which counts the loop body of a "
                  "scanned layer stack once, not once per layer: far below what the step "
                  "executes, and its MFU with it (records made before the unrolled count)."),
    "unrolled": ("†", "FLOPs of the same step with its layer stacks unrolled (the same remat), "
                 "from the lowered program: XLA counts a scanned stack's loop body once."),
    "lowered": ("§", "the lowered program's count: the compiled program's was missing or below "
                "half of it."),
}  # fmt: skip


def steps(r: dict) -> str:
    rows = [
        "| workload | batch | compile s | step ms | ex/s | GFLOP/step | GFLOP/s | MFU | peak MiB "
        "| torch eager ms (ours ×) | torch.compile ms (ours ×) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    used: dict[str, str] = {}
    for name, w in r["workloads"].items():
        if name == "pipeline":
            continue
        cells = []
        for kind in ("torch_eager", "torch_compile"):
            t = w.get(kind)
            if t is None:
                cells.append("—")
            elif "error" in t:
                cells.append(f"failed: {t['error'][:60]}")
            else:
                first = f"; first step {t['compile_s']:.1f} s" if kind == "torch_compile" else ""
                cells.append(f"{_ms(t['step_s'])} ({t['speedup']:.2f}×{first})")
        flops = w["flops_per_step"]
        v = w.get("variant") or {}
        source = w.get("flops_source") or ("loop_once" if v.get("scan") else "compiled")
        mark, note = FLOPS_MARKS.get(source, ("", ""))
        used[mark] = note
        label = f"{name} (scan, remat {v['remat']})" if v.get("scan") else name
        label = f"{name} (remat {v['remat']})" if "scan" in v and not v["scan"] else label
        label = f"{name} (depthwise {v['depthwise']})" if "depthwise" in v else label
        rows.append(
            f"| {label} | {w['examples_per_step']} | {w['compile_s']:.1f} | {_ms(w['step_s'])} | "
            f"{w['examples_per_s']:.2f} | {flops / 1e9:.1f}{mark} | "
            f"{w['achieved_flops_per_s'] / 1e9:.1f}{mark} | {_pct(w['mfu'])}{mark} | "
            f"{_mib(w['peak_bytes'])} | {cells[0]} | {cells[1]} |"
        )
    notes = [f"{m} {text}" for m, text in used.items() if m]
    return "\n".join(rows + ([""] + notes if notes else []))


def _op(name: str) -> str:
    return name if name.startswith("(") else f"`{name}`"  # the untraced row is no op's name


def profiles(r: dict) -> str:
    """Per profiled workload, the op kinds and the ops that took the most time in its traced
    steps (`xmodal bench --profile`)."""
    out = []
    for name, w in r["workloads"].items():
        p = w.get("profile")
        if not p:
            continue
        # Earlier records: shares of the ops' time; since `wall_ms`, of the cores' time (CPU).
        of = "the ops' time"
        if "wall_ms" in p:
            of = f"{p['wall_ms']:,.0f} ms wall x {p['cores']} cores"
        for title, rows_in in (("op kinds", p["by_kind"]), ("ops", p["top_ops"])):
            rows = [f"**{name}: {title} with the most time** ({p['steps']} traced steps; "
                    f"shares of {of})", "",
                    "| op | ms | share | calls |", "|---|---:|---:|---:|"]  # fmt: skip
            rows += [
                f"| {_op(o['name'])} | {o['ms']:,.1f} | {_pct(o['share'])} | {o['calls'] or '—'} |"
                for o in rows_in
            ]
            out.append("\n".join(rows))
    return "\n\n".join(out)


def pipeline(r: dict) -> str:
    p = r["workloads"].get("pipeline")
    if not p:
        return ""
    return (
        f"Input pipeline (batch {p['batch']}): animals {p['animals_examples_per_s']:.0f} "
        f"examples/s, digits source+target {p['digits_paired_examples_per_s']:.0f} examples/s."
    )


def max_batch(a: dict) -> list[str]:
    """The largest CLIP batch that fits per variant, and every batch tried (plan peak MiB)."""
    rows = [
        f"Memory to fit: {_mib(a['memory_limit_bytes'])} MiB.",
        "",
        "| variant | largest batch that fits | smallest batch found not to | tried: batch (peak "
        "MiB, fits) |",
        "|---|---|---|---|",
    ]
    for label, v in a.items():
        if label == "memory_limit_bytes":
            continue
        tried = ", ".join(
            f"{b} ({_mib(t['peak_bytes'])}, {'yes' if t['fits'] else 'no'})"
            for b, t in sorted(v["tried"].items(), key=lambda kv: int(kv[0]))
        )
        largest, above = v["largest"], v["smallest_not_fitting"]
        if largest is None and above is None:
            largest = above = "not finished"
        elif above is None:  # every batch up to the search's cap fitted: a lower bound
            largest, above = f"≥ {largest}", f"none up to the cap, {v['cap']}"
        rows.append(f"| {label} | {largest} | {above} | {tried} |")
    return rows


def conv_forms(a: dict) -> list[str]:
    """Per 3x3 convolution shape and form: output + both gradients, against the matmul ceiling."""
    rows = [
        f"Batch {a['batch']}; output, input gradient and kernel gradient in one call.",
        "",
        "| shape (H x W x C) | form | ms | GFLOP/s | of the f32 matmul ceiling | "
        "max rel. diff vs xla |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape, forms in a.items():
        if shape == "batch":
            continue
        for form, v in forms.items():
            diff = v.get("max_rel_diff_vs_xla")
            diff = "—" if diff is None else f"{diff:.1e}"
            rows.append(
                f"| {shape} | {form} | {v['ms']:,.1f} | {v['gflops']:,.1f} | "
                f"{_pct(v['of_matmul_peak'])} | {diff} |"
            )
    return rows


def ablations(r: dict) -> str:
    out = []
    for name, a in r.get("ablations", {}).items():
        if name in ("depthwise", "max_pool", "cotangent"):
            rows = ["| quantity | value |", "|---|---|"]
            rows += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v:.4g} |"
                     for k, v in a.items()]  # fmt: skip
        elif name == "cpu_backends":
            rows = cpu_backends(a)
        elif name == "malloc":
            rows = malloc(a)
        elif name == "residuals":
            rows = residuals(a)
        elif name == "max_batch":
            rows = max_batch(a)
        elif name == "conv_forms":
            rows = conv_forms(a)
        else:
            rows = ["| variant | compile s | step ms | ex/s | peak MiB |", "|---|---|---|---|---|"]
            for label, v in a.items():
                rows.append(
                    f"| {label} | {v['compile_s']:.1f} | {_ms(v['step_s'])} | "
                    f"{v['examples_per_s']:.2f} | {_mib(v['peak_bytes'])} |"
                )
        out.append(f"**{name}**\n\n" + "\n".join(rows))
    return "\n\n".join(out)


_LABELS = ("flags", "tunables", "settings")  # a process comparison's names of its variants


def _workload_rows(a: dict) -> list[tuple[str, dict]]:
    """`(workload, {variant: figures})` of a process comparison (`backends.compare`)."""
    return [(w, row) for w, row in a.items() if isinstance(row, dict) and w not in _LABELS]


def _process_variants(
    a: dict, column: str, label: dict[str, str], rss: bool, reference: str = "default"
) -> list[str]:
    """Rows of a comparison of train steps run in processes of their own (`backends.compare`):
    per workload and variant (named with `label[variant]`), the median step, its speed against
    the first variant, optionally the process's peak resident memory, and the first update's
    distance to the first variant's."""
    rows = [
        f"| workload | {column} | compile s | step ms | speed vs {reference} | "
        + ("peak RSS MiB | " if rss else "")
        + f"first update vs {reference} (max rel. diff) |",
        "|---" * (6 + rss) + "|",
    ]
    for workload, row in _workload_rows(a):
        for variant, v in row.items():
            name = f"{variant} (`{label[variant] or 'none'}`)"
            if "error" in v:
                rows.append(f"| {workload} | {name} | failed: {v['error']} |" + " |" * (3 + rss))
                continue
            diff = v["update_max_abs_diff_rel"]
            rows.append(
                f"| {workload} | {name} | {v['compile_s']:.1f} | {_ms(v['step_s'])} | "
                f"{v['speed_vs_default']:.2f}x | "
                + (f"{v['max_rss_mib']:,.0f} | " if rss else "")
                + f"{'n/a' if diff is None else f'{diff:.2g}'} |"
            )
    return rows


def _turns(a: dict, what: str) -> str:
    """How the variants of a process comparison took turns."""
    first = ", each round starting with the next" if a.get("rotated") else ""
    return f"\n{a['rounds']} rounds, {what} alternating{first}, each in its own process."


def cpu_backends(a: dict) -> list[str]:
    """Rows of the XLA:CPU kernel-backend ablation (`_process_variants`, each backend named with
    its XLA flag)."""
    rows = _process_variants(a, "backend (XLA flag)", a["flags"], rss=False)
    return rows + [_turns(a, "the backends")]


def residuals(a: dict) -> list[str]:
    """Rows of the residual-stream ablation (`_process_variants`, each setting named with its
    environment variable), with the instructions in each program's fusions."""
    rows = _process_variants(a, "setting", a["settings"], rss=True, reference="fused")
    rows += ["", "| workload | setting | fused instructions |", "|---|---|---|"]
    for workload, row in _workload_rows(a):
        for variant, v in row.items():
            n = v.get("fused_instructions")  # none where the variant's process failed
            rows.append(f"| {workload} | {variant} | {'n/a' if n is None else f'{n:,}'} |")
    return rows + [_turns(a, "the settings")]


def malloc(a: dict) -> list[str]:
    """Rows of the allocator ablation (`_process_variants`): glibc's default and the `xmodal`
    setting (transparent huge pages), with the processes' peak resident memory."""
    head = [f"glibc {a['glibc']}, transparent huge pages `{a['thp_mode']}`.", ""]
    rows = _process_variants(a, "allocator (`GLIBC_TUNABLES`)", a["tunables"], rss=True)
    return head + rows + [_turns(a, "the two")]


def test_run(r: dict) -> str:
    """One line on a timed test run: what ran, how long, where, with what."""
    v = r["versions"]
    outcome = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors"
    minutes, seconds = divmod(round(r["wall_s"]), 60)
    commit = (r["git"]["commit"] or "unknown")[:7] + (" + changes" if r["git"]["dirty"] else "")
    family = f"({r['cpu_family']})" if r.get("cpu_family") else ""  # recorded since 2026-12-07
    cpu = " ".join(filter(None, (r["cpu"], family, r.get("cpu_simd"))))
    cached = r.get("compilation_cache_entries")  # recorded since December 2026
    cache = ""
    if cached == 0:
        cache = "; cold compilation cache"
    elif cached:
        cache = f"; {cached} programs in the compilation cache at the start"
    return (
        f"`{r['command']}`: {outcome} in {minutes} min {seconds} s "
        f"({r['date']}; {cpu}, {r['usable_cpus']} cores{cache}; python {v['python']}, jax "
        f"{v['jax']}, jaxlib {v['jaxlib']}, commit {commit}).\n"
    )


def tower_params(r: dict) -> str:
    """The parameter counts of `benchmarks/tower_params.py`'s record, one row per tower."""
    v, commit = r["versions"], (r["git"]["commit"] or "unknown")[:7]
    lines = [
        f"*`{r['command']}` ({r['date']}; jax {v['jax']}, flax {v['flax']}, commit {commit})*",
        "",
        "| tower | parameters (no head) |",
        "|---|---:|",
    ]
    lines += [f"| `{name}` | {n / 1e6:,.2f} M |" for name, n in sorted(r["params"].items())]
    return "\n".join(lines) + "\n"


def parity(r: dict) -> str:
    """`benchmarks/parity.py`'s record: per format and output, the measured largest difference
    from the original library relative to its largest value, beside the bound its test asserts
    (the absolute difference too where that bound is absolute)."""
    v, commit = r["versions"], (r["git"]["commit"] or "unknown")[:7]
    dirty = " + changes" if r["git"]["dirty"] else ""
    oracles = ", ".join(
        f"{name} {v[name]}"
        for name in ("torch", "transformers", "timm", "open-clip-torch")
        if v.get(name)
    )
    lines = [
        f"*`{r['command']}` ({r['date']}; jax {v['jax']}, {oracles}, commit {commit}{dirty})*",
        "",
        "| format | output | measured max rel. error | bound asserted by the test (file) |",
        "|---|---|---:|---|",
    ]
    for row in r["rows"]:
        measured = f"{row['max_rel_err']:.1e}"
        if "absolute" in row["bound"]:
            measured += f" ({row['max_abs_err']:.1e} absolute)"
        lines.append(
            f"| {row['format']} | {row['output']} | {measured} | {row['bound']} (`{row['test']}`) |"
        )
    return "\n".join(lines) + "\n"


def quickstart_timing(r: dict) -> str:
    """The quick start's wall time from nothing, split by phase (`timing.json` of the run); with
    `--fresh-clone`, the install before it and the two together."""
    v, commit = r["versions"], (r["git"]["commit"] or "unknown")[:7]
    order = ("set-up", "data build", "feature extraction", "compile", "training", "evaluation",
             "checkpoints", "summary and plots")  # fmt: skip
    phases = {k: r["phases_s"][k] for k in sorted(r["phases_s"], key=lambda k: (
        order.index(k) if k in order else len(order), k))}  # fmt: skip
    lines = [
        f"*`{r['command']}` ({r['date']}; {r['cpu']}, {r['usable_cpus']} cores; jax {v['jax']}, "
        f"commit {commit}{' + changes' if r['git']['dirty'] else ''})*",
        "",
        "| phase | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {s:.1f} |" for name, s in phases.items()]
    other = r["wall_s"] - sum(phases.values())
    lines += [f"| Python and JAX start-up, config | {other:.1f} |"]
    lines += [f"| **total** | **{r['wall_s']:.1f}** |"]
    if r.get("install_s") is not None:  # `--fresh-clone`: the README's first command as a whole
        lines += [
            f"| `make install` in the fresh clone (no pip cache) | {r['install_s']:.1f} |",
            f"| **`make quickstart` from a fresh clone** | "
            f"**{r['install_s'] + r['wall_s']:.1f}** |",
        ]
    return "\n".join(lines) + "\n"


def memory_check(r: dict) -> str:
    """The step's peak memory from XLA's buffer plan against the process's resident memory,
    per case, and the growth of each from a workload's smallest batch to its largest."""
    v, commit = r["versions"], (r["git"]["commit"] or "unknown")[:7]
    lines = [
        f"*`{r['command']}` ({r['date']}; {r['cpu']}, {r['usable_cpus']} cores; jax {v['jax']}, "
        f"commit {commit}{' + changes' if r['git']['dirty'] else ''})*",
        "",
        "| workload | batch | plan peak MiB (bench) | plan beyond arguments MiB | resident in the "
        "steps above baseline MiB | resident / plan | process peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_workload: dict[str, list[dict]] = {}
    for c in r["cases"]:
        plan, rss = c["plan_beyond_arguments_bytes"], c["rss_step_above_baseline_bytes"]
        lines.append(
            f"| {c['workload']} | {c['batch']} | {_mib(c['plan_peak_bytes'])} | {_mib(plan)} | "
            f"{_mib(rss)} | {rss / plan:.2f} | {_mib(c['process_peak_bytes'])} |"
        )
        by_workload.setdefault(c["workload"], []).append(c)
    lines += ["", "| workload | batches | plan peak growth MiB | process peak growth MiB |"]
    lines += ["|---|---|---:|---:|"]
    for name, cases in by_workload.items():
        lo, hi = min(cases, key=lambda c: c["batch"]), max(cases, key=lambda c: c["batch"])
        plan = hi["plan_peak_bytes"] - lo["plan_peak_bytes"]
        proc = hi["process_peak_bytes"] - lo["process_peak_bytes"]
        lines.append(f"| {name} | {lo['batch']} → {hi['batch']} | {_mib(plan)} | {_mib(proc)} |")
    return "\n".join(lines) + "\n"


def tables(r: dict) -> str:
    """The run's line (command, machine, load, ceilings), its step table (workloads other than
    the pipeline), pipeline figures and ablation tables; for a test-run record, its line; for a
    tower-parameter or parity record, its table."""
    if r.get("kind") == "test_run":
        return test_run(r)
    if r.get("kind") == "tower_params":
        return tower_params(r)
    if r.get("kind") == "quickstart_timing":
        return quickstart_timing(r)
    if r.get("kind") == "parity":
        return parity(r)
    if r.get("kind") == "memory_check":
        return memory_check(r)
    parts = [f"*{header(r)}*"]
    if any(k != "pipeline" for k in r["workloads"]):
        parts.append(steps(r))
    if any(w.get("profile") for w in r["workloads"].values()):
        parts.append(profiles(r))
    if r["workloads"].get("pipeline"):
        parts.append(pipeline(r))
    if r.get("ablations"):
        parts.append(ablations(r))
    return "\n\n".join(parts) + "\n"


def markdown_path(json_path: str) -> str:
    return json_path[: -len(".json")] + ".md"


def main(paths: list[str]) -> None:
    if paths and paths[0] == "--write":
        for path in paths[1:]:
            with open(path) as f:
                text = tables(json.load(f))
            with open(markdown_path(path), "w") as f:
                f.write(text)
        return
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        if r.get("kind") in (
            "test_run", "tower_params", "quickstart_timing", "parity", "memory_check",
        ):  # fmt: skip
            print(tables(r))
            continue
        print(f"### {path}\n\n{header(r)}\n")
        if any(k != "pipeline" for k in r["workloads"]):
            print(steps(r) + "\n")
        print(profiles(r) + "\n")
        print(pipeline(r) + "\n")
        print(ablations(r) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
