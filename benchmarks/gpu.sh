#!/usr/bin/env bash
# Workloads (1)-(3) of `xmodal bench` at full size in bfloat16 on one GPU, with MFU against the
# card's bf16 matmul peak measured in the same run. Needs a CUDA build of jaxlib in .venv.
#
#   benchmarks/gpu.sh                 # H100 / H200: batch 128 per step (per domain for DANN)
#   benchmarks/gpu.sh --small         # the same script on CPU at tiny sizes (a smoke test)
#
# Extra arguments go to `xmodal bench`; BATCH, PYTHON and OUT override the defaults. The whole
# run is bounded by `timeout` to 8 minutes, compilation included.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu_results.json}
batch=(--batch "${BATCH:-128}")
for arg in "$@"; do
  if [[ $arg == --small ]]; then batch=(); fi
done
exec timeout 480 "$PYTHON" -m xmodal_jax.main bench --workloads clip,resnet50,mnv2_dann \
  --dtype bfloat16 --steps 20 --json "$OUT" "${batch[@]}" "$@"
