"""Helpers shared by the benchmark scripts: device names, result files, random BFT inputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bft.atomic import atomic_write_text
from bft.environment import device_name  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def write_json_atomic(path: Path, payload: dict) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def bft_inputs(N, H, V, *, dtype=torch.float32, device="cpu", seed=0, requires_grad=True, generator_device="cpu"):
    """Student/aligned/base hidden states and heads with logits of realistic spread (std ≈ 3).

    ``generator_device`` is where the random numbers are drawn: "cpu" (default) gives the same values on every
    device; the device itself is much faster for GPU-sized heads (a [128256, 4096] draw takes seconds on a CPU)."""
    gdev = torch.device(generator_device)
    g = torch.Generator(device=gdev).manual_seed(seed)
    out = []
    for _ in range(3):
        h = torch.randn(N, H, generator=g, device=gdev).to(device=device, dtype=dtype)
        w = (torch.randn(V, H, generator=g, device=gdev) * (3.0 / H**0.5)).to(device=device, dtype=dtype)
        out += [h, w]
    if requires_grad:
        out[0].requires_grad_(True)
        out[1].requires_grad_(True)
    harmful = (torch.arange(N, device=device) % 5) < 2  # the paper's 0.4 harmful ratio
    return out, harmful
