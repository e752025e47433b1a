#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in bounded runs on one CUDA GPU. Stage `steps`: workloads
# (1)-(3) of `xmodal bench` at full size in bfloat16, MFU against the card's bf16 matmul peak
# measured in the same run, PyTorch eager and torch.compile alternating with ours in the same
# process, and where each of our steps spends its time (3 traced steps: the ops and op kinds
# with the most time) (at most 6 minutes). Stage `ablations`: the CLIP step scanned with remat='dots', the
# trainer's FSDP path on this chip beside the plain step, and the largest CLIP batch that fits,
# scanned and unrolled (at most 9 minutes). Each stage fits one 10-minute command.
#
#   benchmarks/gpu_wheels.sh          # first, where there is network: .gpu_wheels/
#   benchmarks/gpu.sh [steps|ablations|all]   # on the GPU machine (H100 / H200): batch 128
#   benchmarks/gpu.sh --small         # the same script on CPU at tiny sizes (a smoke test)
#
# PYTHON (default: .venv/bin/python, else python3, the image's Python with CUDA JAX and
# PyTorch), BATCH (128; per domain for DANN) and RESULTS (benchmarks/results) override the
# defaults. Where .gpu_wheels/ exists, what the image lacks of the runtime dependencies is
# installed from it without an index; the package itself runs from the checkout (PYTHONPATH).
# Records: RESULTS/gpu_versions.json (the software stack), gpu_steps.json,
# gpu_clip_ablations.json; each bench is bounded by `timeout` (compilation included) and keeps
# what it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS=${RESULTS:-benchmarks/results}
BATCH=${BATCH:-128}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

small=()
batch=(--batch "$BATCH")
memory=()
stage=all
for arg in "$@"; do
  case $arg in
    --small) small=(--small); batch=(); memory=(--memory-gib 0.05) ;;
    steps | ablations | all) stage=$arg ;;
    *) echo "gpu.sh: unknown argument $arg (use --small, steps, ablations or all)" >&2; exit 2 ;;
  esac
done

if [[ -d .gpu_wheels ]]; then
  "$PYTHON" -m pip install -q --no-index --no-build-isolation --find-links .gpu_wheels \
    "grain==0.2.18" "tensorflow-datasets==4.9.10" "ml_collections==1.1.0" "tensorboardX==2.6.5" \
    || echo "gpu.sh: installing from .gpu_wheels failed; what is missing fails the import next"
fi

"$PYTHON" - "$RESULTS/gpu_versions.json" <<'EOF'
import json, sys
import jax
from xmodal_jax import provenance
record = {
    "versions": provenance.versions(("torch", "jax-cuda13-plugin", "jax-cuda12-plugin")),
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "cpu": provenance.cpu_model(),
}
with open(sys.argv[1], "w") as f:
    json.dump(record, f, indent=1)
print(json.dumps(record))
EOF

bench() { timeout "$1" "$PYTHON" -m xmodal_jax.main bench "${@:2}" || echo "bench exited $?"; }
if [[ $stage == all || $stage == steps ]]; then
  # PyTorch shares the card in this process: JAX allocates as it goes instead of taking 75% of
  # the memory up front, so the references are not starved of it.
  XLA_PYTHON_CLIENT_PREALLOCATE=false bench 360 --torch --profile \
    --workloads clip,resnet50,mnv2_dann --dtype bfloat16 --steps 20 --rounds 2 \
    "${small[@]}" "${batch[@]}" --json "$RESULTS/gpu_steps.json"
fi
if [[ $stage == all || $stage == ablations ]]; then
  bench 540 --workloads clip --scan --remat dots --dtype bfloat16 --steps 10 \
    --ablations fsdp,max_batch "${small[@]}" "${batch[@]}" "${memory[@]}" \
    --json "$RESULTS/gpu_clip_ablations.json"
fi
