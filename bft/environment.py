"""What machine a result was measured on: the device name written into every benchmark and report JSON."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def device_name(device="cpu") -> str:
    """The GPU's name for a CUDA device; for the CPU its model name with the core count, e.g. "AMD EPYC (2 cores)"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def package_versions(packages=("torch", "transformers", "bft")) -> dict:
    """Installed versions of ``packages`` (None where one is not installed), recorded with every result."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
