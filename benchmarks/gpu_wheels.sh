#!/usr/bin/env bash
# Wheels of the runtime dependencies that a CUDA machine's image may lack, for a machine with no
# network: Python 3.12, manylinux x86-64, into .gpu_wheels/ (git-ignored; copy it along with the
# checkout). benchmarks/gpu.sh installs them there without an index before it runs.
#
#   benchmarks/gpu_wheels.sh            # here, with network (about 10 MB)
#
# The list is what setup.cfg requires beyond jax, flax, optax, orbax-checkpoint, numpy,
# tokenizers, safetensors, scikit-learn, pillow, matplotlib and tqdm (a CUDA image with JAX and
# PyTorch usually has those), with their own dependencies; `promise` exists as a source archive
# only (pure Python, installed from it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-.gpu_wheels}
mkdir -p "$OUT"
"$PYTHON" -m pip download -q --dest "$OUT" --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  "grain==0.2.18" "tensorflow-datasets==4.9.10" "ml_collections==1.1.0" "tensorboardX==2.6.5" \
  "array-record==0.8.6" "dm-tree==0.1.10" "immutabledict==4.3.1" "simple-parsing==0.1.9" \
  "docstring-parser==0.18.0" "tensorflow-metadata==1.21.0" "googleapis-common-protos==1.76.0" \
  "termcolor==3.3.0" "toml==0.10.2" "portpicker==1.6.0" "importlib_resources==7.1.0"
"$PYTHON" -m pip download -q --dest "$OUT" --no-deps --no-binary=:all: "promise==2.3"
ls "$OUT"
