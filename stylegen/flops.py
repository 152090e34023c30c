"""Throughput accounting: the FLOPs of one training step, counted once, and model FLOPs utilisation.

The count comes from torch's dispatcher-level counter (``torch.utils.flop_counter``) around one
real training step, so it includes everything that step runs for the configured model: the
generator's forward and backward (identity samples included), every VGG pass of the losses (and of
``model.vgg_adain``), the discriminator when it is on. Convolutions and matmuls are counted (2
FLOPs per multiply-add); elementwise work is not, as in the usual MFU definition.

MFU = achieved FLOP/s of a worker / that worker's peak (``train.peak_flops``, or a default by
device: the dense bf16 tensor-core peak of known GPUs, a rough fp32 figure per thread on CPU by its
vector width).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")

# Dense (not sparse) bf16 peak FLOP/s from the vendors' datasheets, matched on the device name.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
                  "V100": 125e12, "T4": 65e12}


def cpu_flops_per_thread(capability: str | None = None) -> float:
    """A rough fp32 peak of one CPU core: 2 FMA units x fp32 lanes x 2 FLOPs x 2.4 GHz, the lanes by torch's
    CPU capability (``torch.backends.cpu.get_cpu_capability()``): 16 with AVX-512 (153.6 GFLOP/s), 8 with
    AVX2 (76.8), 4 otherwise. Set train.peak_flops for your CPU. Measured on an AVX-512 machine: the demo's
    tiny model ran its convs at 75 GFLOP/s on one thread (MFU 49 %)."""
    cap = capability if capability is not None else torch.backends.cpu.get_cpu_capability()
    lanes = 16 if cap.startswith("AVX512") else 8 if cap == "AVX2" else 4
    return 2 * lanes * 2 * 2.4e9


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), FLOPs it ran)``: counts convolutions and matmuls, forward and backward."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def default_peak_flops(device: torch.device, threads: int) -> float:
    """Peak FLOP/s of one worker's device when ``train.peak_flops`` is 0."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
        return 100e12  # an unknown GPU: set train.peak_flops
    return cpu_flops_per_thread() * max(threads or torch.get_num_threads(), 1)


def mfu(flops_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1] (0 when the peak is unknown)."""
    return flops_per_s / peak_flops if peak_flops > 0 else 0.0
