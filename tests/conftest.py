"""Test set-up before jax is imported anywhere: virtual CPU devices (8 by default;
`XMODAL_TEST_DEVICES` sets the count: `make test` runs the `mesh` tests on 8 and the rest on 1,
where a step is a single-device program), one compilation cache, a core per xdist worker, and
XLA's backend optimisations off except in the regression tier."""

import importlib.metadata
import json
import os
import shlex
import time

DEVICES = int(os.environ.get("XMODAL_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, its xdist workers and the subprocesses
# they start: a program compiled once (the same tiny model trained by many tests, a subprocess
# repeating an in-process run) is read back instead of compiled again. Entries are keyed by the
# program, its compile options and the devices, so a changed code path never reuses a stale one.
# Programs compiled in under 0.1 s (mostly single ops run eagerly) are not written: writing an
# entry costs about as much as compiling it again, and a fresh clone's run writes over a thousand
# (three long test modules on one core, cold: 49 s with them, 39 s without).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402

_STARTED = pytest.StashKey[float]()
_CACHED = pytest.StashKey[int]()

# XLA:CPU's older elemental emitters compile a step in about half the time of its fusion
# emitters at the same run time when optimisations are off (ResNet-18 train step 2.7 -> 1.1 s,
# ViT-Ti 5.3 -> 3.4 s, MobileNetV2 8.3 -> 4.4 s; one op on a new shape 32 -> 16 ms). jaxlib 0.11
# removed the flag (an unknown flag in XLA_FLAGS stops XLA), so it is set for 0.10 only.
FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
FAST_COMPILE_JAXLIB = "0.10."


def pytest_configure(config):
    """Most tests run a few steps of many small programs, so XLA's backend optimisations cost
    more compile time than they save (the bench test's run: 142 s with them, 71 s without).
    The regression tier (`-m slow`) keeps XLA's defaults: its records were made by them."""
    expr = config.getoption("markexpr") or ""
    regression_tier = "slow" in expr and "not slow" not in expr
    if not regression_tier:
        os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        if importlib.metadata.version("jaxlib").startswith(FAST_COMPILE_JAXLIB):
            os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
        _pin_xdist_worker()


# Modules by their time on one core, longest first; they run in this order (make test passes
# --no-loadscope-reorder: xdist would otherwise order modules by their number of tests), so
# the two workers take the long ones first and finish together. Unlisted modules follow.
LONG_MODULES = (
    "test_quickstart.py", "test_multihost.py", "test_coco_configs.py", "test_resume.py",
    "test_zeroshot_adaptation.py", "test_faults.py", "test_finetune.py", "test_animals_configs.py",
    "test_bench.py", "test_two_tower.py", "test_towers.py", "test_sharding.py", "test_cli.py",
    "test_tta.py", "test_zeroshot_tent.py", "test_protocol.py", "test_office31.py",
    "test_domain_adaptation.py", "test_adaptation.py", "test_fusion.py", "test_pipeline.py",
    "test_corruption_configs.py", "test_remote_workdir.py", "test_open_clip.py", "test_rules.py",
    "test_converters.py", "test_pretrained.py",
)  # fmt: skip


# The slow tier's longest cases (`make test-slow` keeps this order): its two scopes, the module's
# cases and `TestLongCase`, start first, one on each worker.
FIRST_MODULES = ("test_regression.py",)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST_MODULES + LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_addoption(parser):
    parser.addoption(
        "--timing-record",
        metavar="PATH",
        help="write this run's wall time, test counts, machine and versions to PATH as JSON "
        "(make test-slow RECORD=PATH; `make tables` turns it into the README's figure)",
    )
    parser.addoption(
        "--timing-record-append",
        action="store_true",
        help="add this run to the record at --timing-record (a tier run as two pytest "
        "commands, one per device count): wall times and counts summed, tests merged",
    )


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.time()
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # programs compiled before: a warm run
    session.config.stash[_CACHED] = len(os.listdir(cache)) if os.path.isdir(cache) else 0


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With `--timing-record PATH` (on the controller, not on an xdist worker): the record."""
    path = config.getoption("--timing-record")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from xmodal_jax import provenance

    reports = [r for reps in terminalreporter.stats.values() for r in reps]
    calls = [r for r in reports if getattr(r, "when", "") == "call"]
    record = {
        "kind": "test_run",
        "command": shlex.join(
            ["pytest", *(a for a in config.invocation_params.args if "timing-record" not in a)]
        ),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "wall_s": round(time.time() - config.stash[_STARTED], 1),
        "exit_status": int(exitstatus),
        "passed": sum(r.outcome == "passed" for r in calls),
        "failed": sum(r.outcome == "failed" for r in calls),
        "errors": sum(r.outcome == "failed" and r.when != "call" for r in reports),
        "tests": {r.nodeid: round(r.duration, 1) for r in calls},
        "cpu": provenance.cpu_model(),
        "cpu_simd": provenance.cpu_simd(),
        "cpu_family": provenance.cpu_family(),
        "usable_cpus": provenance.usable_cpus(),
        "compilation_cache_entries": config.stash[_CACHED],
        "git": provenance.git_state(ROOT),
        "versions": provenance.versions(),
    }
    if config.getoption("--timing-record-append"):
        with open(path) as f:
            first = json.load(f)
        if (first.get("git") or {}).get("commit") != record["git"]["commit"]:
            raise pytest.UsageError(f"{path} records another commit; rerun the whole tier.")
        record["git"] = first["git"]  # as the tier began: the first part's record dirties it
        record["compilation_cache_entries"] = first.get("compilation_cache_entries")
        record["command"] = f"{first['command']} && {record['command']}"
        for key in ("wall_s", "passed", "failed", "errors"):
            record[key] = round(first[key] + record[key], 1)
        record["exit_status"] = max(first["exit_status"], record["exit_status"])
        record["tests"] = {**first["tests"], **record["tests"]}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    terminalreporter.write_line(f"timing record: {path}")


def xla_flags(devices: int) -> str:
    """This run's XLA_FLAGS with `devices` virtual devices, for a subprocess on another count."""
    flags = [f for f in os.environ["XLA_FLAGS"].split() if "host_platform_device_count" not in f]
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])


def _pin_xdist_worker() -> None:
    """Under pytest-xdist each worker gets its own share of the cores before XLA starts, so that
    the workers' thread pools do not spin against each other (XLA sizes them by the affinity
    mask). Not in the regression tier: a record made on 2 cores is reproduced on 2 cores."""
    worker, workers = (
        os.environ.get("PYTEST_XDIST_WORKER"),
        os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
    )
    if not (worker and workers and hasattr(os, "sched_setaffinity")):
        return
    cpus, n = sorted(os.sched_getaffinity(0)), int(workers)
    if len(cpus) >= n > 1:  # a worker restarted after a crash is numbered n, n + 1, ...
        os.sched_setaffinity(0, cpus[int(worker[2:]) % n :: n])


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """A TFDS data dir for this test session; embedded datasets are built into it on first use."""
    path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    os.environ["TFDS_DATA_DIR"] = path
    return path


@pytest.fixture(autouse=True)
def _optimized(request):
    """A test marked `optimized` runs long enough that XLA's optimisations pay for themselves
    (the quick-start test: 89 s without them, 67 s with them, on one core)."""
    if not request.node.get_closest_marker("optimized"):
        yield
        return
    import jax

    before = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1"
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True)
def _mesh_needs_eight_devices(request):
    """A `mesh` test fails, never skips, when the process has fewer than 8 devices."""
    if request.node.get_closest_marker("mesh") and DEVICES < 8:
        pytest.fail(
            f"{request.node.nodeid} is a `mesh` test and needs 8 devices; this run has "
            f"XMODAL_TEST_DEVICES={DEVICES}. Run it with XMODAL_TEST_DEVICES=8 (as make test does)."
        )
