#!/usr/bin/env bash
# One short run (< 5 minutes) for a machine with an NVIDIA GPU: PreAct ResNet-18 on CIFAR-sized random images
# (torchvision FakeData, 3x32x32, 10 classes, synthetic q/eta candidate sets), one warm-up and two Co-Reg epochs.
# Prints images per second of the timed Co-Reg epoch, the epoch / floor ratio of benchmarks/speed.py (the same
# forward and backward passes replayed in isolation; goal <= 1.3) and peak GPU memory.
# Writes benchmarks/out/gpu_check.json.   Usage: bash benchmarks/gpu_check.sh   (PY=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-10000}
WORKERS=${WORKERS:-4}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found; this check needs an NVIDIA GPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

timeout 300 "$PY" benchmarks/speed.py --data fake --backbone preact_resnet18 --image-size 32 --n "$N" \
  --batch-size 256 --warmup-epochs 1 --coreg-epochs 2 --device cuda --num-workers "$WORKERS" \
  --out benchmarks/out/gpu_check.json
