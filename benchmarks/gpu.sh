#!/usr/bin/env bash
# GPU figures of docs/benchmarks.md, unchanged on any machine with NVIDIA GPUs and this repo's
# venv: samples/s, checkpoint GB/s, async blocking seconds, weak-scaling efficiency.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run this on a GPU machine")'
"$python" benchmarks/gpu.py "$@"
