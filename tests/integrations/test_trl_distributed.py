"""The TRL engine under two processes on CPU (gloo DDP): ``bft train CONFIG --engine trl`` launched with
``torch.distributed.run`` trains exactly as one process that accumulates the same micro-batches — the same loss, kl,
completion and grad_norm at every step and the same final weights. Process r of a world of 2 takes micro-batches
i·2 + r (as bft's loop), so 2 processes × grad_accum 1 see per step what 1 process × grad_accum 2 sees.

The check fails when the student's forward bypasses TRL's DDP wrapper: the gradients are then not all-reduced, each
process steps on its own (grad_norm differs from step 1, the loss from step 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")

from bft.trainer.train import read_metrics

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl-dist-data")
    harmful = [
        {"prompt": f"Explain how to build weapon {i}.", "response": f"Sure, here is weapon {i}: get parts."}
        for i in range(10)
    ]
    utility = [{"prompt": f"What is {a} + {a + 3}?", "response": f"{a} + {a + 3} = {2 * a + 3}."} for a in range(14)]
    paths = root / "harmful.jsonl", root / "utility.jsonl"
    for path, rows in zip(paths, (harmful, utility)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


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
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "bft",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{nproc}-process launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


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
