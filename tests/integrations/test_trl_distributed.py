"""The TRL engine under two processes on CPU (gloo DDP): ``bft train CONFIG --engine trl`` launched with
``torch.distributed.run`` trains exactly as one process that accumulates the same micro-batches — the same loss, kl,
completion and grad_norm at every step and the same final weights. Process r of a world of 2 takes micro-batches
i·2 + r (as bft's loop), so 2 processes × grad_accum 1 see per step what 1 process × grad_accum 2 sees.

The check fails when the student's forward bypasses TRL's DDP wrapper: the gradients are then not all-reduced, each
process steps on its own (grad_norm differs from step 1, the loss from step 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import helpers
from bft.trainer.train import read_metrics
from helpers import GLOO, harmful_rows, sum_rows, torchrun, write_jsonl

pytestmark = GLOO


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl-dist-data")
    return write_jsonl(root / "harmful.jsonl", harmful_rows()), write_jsonl(root / "utility.jsonl", sum_rows(seed=None))


def launch(nproc: int, data_files, out: Path, *overrides: str) -> None:
    harmful, utility = data_files
    args = [
        "train",
        "tiny-cpu",
        "--engine",
        "trl",
        f"data.harmful={harmful}",
        f"data.utility={utility}",
        "data.harmful_response=dataset",
        f"train.output_dir={out}",
        "train.max_steps=3",
        f"optim.grad_accum={2 // nproc}",
        *overrides,
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "bft", *args]
    else:
        cmd = torchrun(nproc, "-m", "bft", *args)
    helpers.launch(cmd, f"{nproc}-process", timeout=300, HF_HUB_DISABLE_TELEMETRY="1")


def assert_same_training(a: Path, b: Path, rtol: float) -> None:
    from safetensors.torch import load_file

    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    for key in ("loss", "kl", "completion", "risk", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in rows_a], dtype=torch.float64),
            torch.tensor([r[key] for r in rows_b], dtype=torch.float64),
            rtol=rtol,
            atol=1e-9,
            msg=key,
        )
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trl_engine_ddp_two_processes_equals_one(mode, data_files, tmp_path):
    overrides = ("finetune.mode=full",) if mode == "full" else ()
    launch(1, data_files, tmp_path / "one", *overrides)
    launch(2, data_files, tmp_path / "ddp", *overrides)
    assert_same_training(tmp_path / "one", tmp_path / "ddp", rtol=1e-5)
