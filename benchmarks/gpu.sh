#!/usr/bin/env bash
# GPU checks in one short run (about 5 minutes on one H100): CUDA, bf16, single-GPU training without
# NCCL, and vit-b-32 at batch 256 in bf16, eager and compiled, against open_clip on the same settings.
#
#   bash benchmarks/gpu.sh                  # needs a CUDA GPU; open_clip optional (pip install open_clip_torch)
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh   # the same commands at toy sizes on the CPU: checks this script
#
# Smoke mode exists because GPUs are rare where this project is developed: a test runs it (under -m slow),
# so the first run on a GPU fails, if at all, on the GPU and not on a typo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${GPU_SH_SMOKE:-0}" == 1 ]]; then
    device=cpu model=tiny shape=small batch=2 steps=1 warmup=1 train_batch=8 train_steps=2 train_samples=64
    val_samples=64
else
    device=cuda model=vit-b-32 shape=vit-b-32 batch=256 steps=10 warmup=3 train_batch=256 train_steps=40
    train_samples=4096 val_samples=1000
fi
DEVICE=$device python - <<'PY'
import os
import torch
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device (GPU_SH_SMOKE=1 runs this script's commands on the CPU)"
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
else:
    print("smoke mode: device cpu | torch", torch.__version__)
PY
# A real (tiny) training run: one process, no process group, bf16 chosen by precision auto.
out=$(mktemp -d)
cliptrain train --data.train_samples "$train_samples" --data.val_samples "$val_samples" --train.steps "$train_steps" \
    --train.batch_size "$train_batch" --train.progress false --train.output_dir "$out" --train.name smoke \
    --eval.every_epochs 0 | tail -n 12
rm -rf "$out"
# Throughput, MFU and peak memory: ours alone, then ours against open_clip, eager and torch.compile'd.
python benchmarks/train_step.py --models "$model" --batch-size "$batch" --precision bf16 --steps "$steps" \
    --warmup "$warmup" --device "$device"
python benchmarks/compare_open_clip.py --shapes "$shape" --batch "$batch" --precision bf16 --compile eager compiled \
    --repeats 1 --steps "$steps" --warmup "$warmup" --device "$device"
