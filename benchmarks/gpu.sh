#!/usr/bin/env bash
# GPU checks in one short run (about 5 minutes on one H100): CUDA, bf16, single-GPU training without
# NCCL, and vit-b-32 at batch 256 in bf16, eager and compiled, against open_clip on the same settings.
#
#   bash benchmarks/gpu.sh            # needs a CUDA GPU; open_clip optional (pip install open_clip_torch)
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PY
# A real (tiny) training run on the GPU: one process, no process group, bf16 chosen by precision auto.
cliptrain train --data.train_samples 4096 --train.steps 40 --train.batch_size 256 --train.progress false \
    --train.output_dir /tmp/cliptrain-gpu --train.name smoke --eval.every_epochs 0 | tail -n 12
# Throughput, MFU and peak memory: ours against open_clip, eager and torch.compile'd.
python benchmarks/train_step.py --models vit-b-32 --batch-size 256 --precision bf16 --steps 10 --warmup 3
python benchmarks/compare_open_clip.py --shapes vit-b-32 --batch 256 --precision bf16 --compile eager compiled \
    --repeats 1 --steps 10 --warmup 3
