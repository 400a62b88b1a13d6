"""The GPU being tuned: name, SM count, compute capability and the generator arch that runs there."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Compute capability -> the generator arch whose code the extension dispatches to on that GPU
# (atom_ops._C's arch_for picks the most specific compiled arch; sm90a is cc 9.0 only).
ARCH_FOR_CC = {80: "sm80", 86: "sm86", 87: "sm80", 89: "sm89", 90: "sm90a"}


class NoGpuError(RuntimeError):
    """Tuning needs a CUDA GPU (the message says what was missing)."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    sm_count: int
    cc: int          # major * 10 + minor
    arch: str        # generator arch tuned for, e.g. "sm90a"

    @property
    def slug(self) -> str:
        return gpu_slug(self.name)


def gpu_slug(name: str) -> str:
    """File-name-safe GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a file name from GPU name {name!r}")
    return slug


def arch_for_cc(cc: int) -> str:
    try:
        return ARCH_FOR_CC[cc]
    except KeyError:
        raise NoGpuError(f"compute capability {cc // 10}.{cc % 10} has no generator arch; "
                         f"supported: {sorted(ARCH_FOR_CC)}") from None


def detect_gpu(arch: str = "auto", device: int | None = None) -> GpuInfo:
    """The current CUDA device; ``arch`` = 'auto' derives the arch from its compute capability."""
    import torch

    if not torch.cuda.is_available():
        raise NoGpuError("python -m tuning needs a CUDA GPU: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, CUDA {torch.version.cuda}). Run it on the GPU "
                         "machine after building atom_ops._C (tuning/README.md).")
    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    cc = props.major * 10 + props.minor
    return GpuInfo(props.name, props.multi_processor_count, cc, arch_for_cc(cc) if arch == "auto" else arch)
