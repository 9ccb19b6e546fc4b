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


def bft_inputs(N, H, V, *, dtype=torch.float32, device="cpu", seed=0, requires_grad=True):
    """Student/aligned/base hidden states and heads with logits of realistic spread (std ≈ 3)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(3):
        h = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
        w = (torch.randn(V, H, generator=g) * (3.0 / H**0.5)).to(device=device, dtype=dtype)
        out += [h, w]
    if requires_grad:
        out[0].requires_grad_(True)
        out[1].requires_grad_(True)
    harmful = (torch.arange(N, device=device) % 5) < 2  # the paper's 0.4 harmful ratio
    return out, harmful
