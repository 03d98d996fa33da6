"""Numeric precision: choosing it, autocast contexts, and the fp16 gradient scaler."""
from __future__ import annotations

import contextlib

import torch

# bf16_pure: weights, gradients and optimizer states in bf16 (big_vision's way), computed under bf16 autocast;
# the logit scale and bias stay float32 parameters and every loss is computed in float32.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16_pure": torch.bfloat16}
FP32_PARAMETERS = ("logit_scale", "logit_bias")  # kept float32 under bf16_pure


def to_pure_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every floating parameter and buffer in bf16 except the FP32_PARAMETERS (in place)."""
    model.to(torch.bfloat16)
    for name in FP32_PARAMETERS:
        param = getattr(model, name, None)
        if isinstance(param, torch.nn.Parameter):
            param.data = param.data.float()
    return model


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are hardware-accelerated on `device` (Ampere+ GPU, or a CPU with AVX-512 BF16 / AMX)."""
    if device.type == "cuda":  # not is_bf16_supported(): it also says yes where bf16 is emulated (pre-Ampere)
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        if capability in ("AVX512_BF16", "AMX"):
            return True
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def use_tf32(enabled: bool, device: torch.device) -> bool:
    """On CUDA, let float32 matmuls and convolutions run on TF32 tensor cores (Ampere and later: about 8x the
    full-fp32 rate, with a 10-bit mantissa per product), or forbid it; elsewhere nothing changes. Returns
    whether TF32 is now allowed."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn "auto" into bf16 where the hardware runs it fast, else fp32; validate the rest."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if precision == "fp16" and device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
        raise ValueError("fp16 on CPU needs torch >= 2.3 (torch.amp.GradScaler); use bf16 or fp32")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A `torch.autocast` context for bf16/fp16, or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (it is a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
