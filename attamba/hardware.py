"""Facts about the machine a run trains on: its device, peak FLOP/s and peak memory."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of the accelerators we meet; MFU is relative to these.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A6000": 154.8e12, "L40S": 362e12,
                  "A10": 125e12, "L4": 121e12, "V100": 125e12, "4090": 165e12}


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``train.device``: ``auto`` is the rank's GPU when CUDA is visible, else the CPU."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' requested but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, where nothing is queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s at the training precision (bf16 on GPU, fp32 on CPU); None if unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)
    return _cpu_peak_flops()


def _cpu_peak_flops() -> float:
    """Cores × clock × fp32 FLOPs per cycle (FMA: 2 × vector lanes × 2 units)."""
    flags, mhz = "", 2000.0
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("flags") and not flags:
                flags = line
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = lanes * 2 * 2 if "fma" in flags else lanes * 2
    return (os.cpu_count() or 1) * mhz * 1e6 * per_cycle


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
