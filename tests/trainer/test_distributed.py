"""The trainer under two processes on CPU (gloo): DDP, and FSDP2 with the student sharded.

Each test launches ``distributed_train.py`` (beside this file) with ``torch.distributed.run`` (about 10 s a launch).
FSDP must give the same training as DDP — the same data, the same loss at every step, the same final weights — and
its checkpoints must hold whole tensors (gathered from the shards) and resume to the very curve of a straight run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import helpers
import pytest
import torch
from bft.trainer.train import read_metrics
from helpers import GLOO, harmful_rows, sum_rows, torchrun, write_jsonl

LAUNCHER = Path(__file__).with_name("distributed_train.py")

pytestmark = GLOO


def launch(mode: str, data_files, out: Path, *overrides: str, resume: bool = False) -> None:
    harmful, utility = data_files
    cmd = torchrun(
        2,
        str(LAUNCHER),
        mode,
        "tiny-cpu",
        f"data.harmful={harmful}",
        f"data.utility={utility}",
        "data.harmful_response=dataset",
        f"train.output_dir={out}",
        *overrides,
    ) + (["--resume"] if resume else [])
    helpers.launch(cmd, mode, timeout=240)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-data")
    return write_jsonl(root / "harmful.jsonl", harmful_rows()), write_jsonl(root / "utility.jsonl", sum_rows(seed=None))


@pytest.fixture(scope="module")
def lora_runs(data_files, tmp_path_factory):
    """4 LoRA steps (checkpoints at 2 and 4) under DDP and under FSDP, 2 processes each."""
    runs = {}
    for mode in ("ddp", "fsdp"):
        runs[mode] = tmp_path_factory.mktemp(f"lora-{mode}")
        launch(mode, data_files, runs[mode], "train.max_steps=4", "train.save_every=2")
    return runs


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def assert_same_training(a: Path, b: Path, rtol: float) -> None:
    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] and rows_a
    for key in ("loss", "kl", "completion", "risk", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in rows_a], dtype=torch.float64),
            torch.tensor([r[key] for r in rows_b], dtype=torch.float64),
            rtol=rtol,
            atol=1e-9,
            msg=key,
        )
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=1e-6, msg=name)


def test_ddp_two_processes(lora_runs):
    out = lora_runs["ddp"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # merged student: a plain HF checkpoint


def test_fsdp_trains_exactly_as_ddp(lora_runs):
    """Same data, same losses and gradient norms at every step, same merged weights (to fp32 reduction order)."""
    assert_same_training(lora_runs["ddp"], lora_runs["fsdp"], rtol=1e-4)


def test_fsdp_checkpoint_holds_whole_tensors_and_resumes_exactly(lora_runs, data_files, tmp_path):
    straight = lora_runs["fsdp"]
    saved = torch.load(straight / "checkpoints" / "step-00000004" / "trainable.pt", weights_only=True)
    assert saved and all("lora_" in name for name in saved)
    assert all(type(t) is torch.Tensor for t in saved.values())  # gathered, not DTensor shards
    ddp_saved = torch.load(lora_runs["ddp"] / "checkpoints" / "step-00000004" / "trainable.pt", weights_only=True)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in ddp_saved.items()}

    launch("fsdp", data_files, tmp_path, "train.max_steps=2", "train.save_every=2")
    launch("fsdp", data_files, tmp_path, "train.max_steps=4", "train.save_every=2", resume=True)
    assert_same_training(straight, tmp_path, rtol=1e-6)


def test_fsdp_full_finetuning_matches_ddp(data_files, tmp_path):
    """Full fine-tuning shards every student weight, the lm_head included (the loss reads it whole in the forward)."""
    runs = {}
    for mode in ("ddp", "fsdp"):
        runs[mode] = tmp_path / mode
        launch(
            mode,
            data_files,
            runs[mode],
            "finetune.mode=full",
            "train.max_steps=2",
            "train.save_every=2",
            "optim.grad_accum=1",
        )
    assert_same_training(runs["ddp"], runs["fsdp"], rtol=1e-4)
    saved = torch.load(runs["fsdp"] / "checkpoints" / "step-00000002" / "trainable.pt", weights_only=True)
    head = saved["model.lm_head.weight"]
    assert head.shape[0] >= 100 and type(head) is torch.Tensor  # the whole [V, H] head, not a shard


def test_fsdp_bf16_mixed_precision_trains_like_fp32(lora_runs, data_files, tmp_path):
    """train.mixed_precision=bf16 under FSDP2: parameters are cast to bf16 for the forwards (the loss then gets bf16
    hidden states and heads and accumulates in fp32), gradients are reduced and the master weights kept in fp32."""
    launch("fsdp", data_files, tmp_path, "train.max_steps=4", "train.save_every=4", "train.mixed_precision=bf16")
    fp32_rows, bf16_rows = read_metrics(lora_runs["fsdp"] / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in bf16_rows] == [1, 2, 3, 4]
    for a, b in zip(fp32_rows, bf16_rows):
        assert a["loss"] != b["loss"]  # bf16 really ran
        assert abs(a["loss"] - b["loss"]) <= 0.02 * abs(a["loss"]), (a["loss"], b["loss"])
    wa, wb = final_weights(lora_runs["fsdp"]), final_weights(tmp_path)
    assert all(t.dtype == torch.float32 for t in wb.values())  # the configured model dtype, not the compute dtype
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=2e-2, msg=name)


def test_ddp_and_fsdp_train_from_the_teacher_cache(lora_runs, data_files, tmp_path):
    """Two processes with teacher_cache.path: the main process builds the cache on first use while the other waits,
    then each reads its own rows. DDP from the cache matches the live DDP run (these examples are padded, so to the
    float rounding of padded frozen forwards; tests/trainer/test_cache.py checks 1e-6 on unpadded data), and FSDP
    from the cache matches DDP from the cache as the live runs do."""
    cache = tmp_path / "cache"
    runs = {}
    for mode in ("ddp", "fsdp"):
        runs[mode] = tmp_path / mode
        launch(mode, data_files, runs[mode], "train.max_steps=4", "train.save_every=2", f"teacher_cache.path={cache}")
    assert json.loads((cache / "manifest.json").read_text())["complete"]
    assert_same_training(lora_runs["ddp"], runs["ddp"], rtol=1e-4)
    assert_same_training(runs["ddp"], runs["fsdp"], rtol=1e-4)


def test_ending_process_group_ends_a_started_group_after_the_block_whether_it_finished_or_raised(tmp_path):
    import torch.distributed as dist
    from bft.trainer.train import ending_process_group

    with ending_process_group():  # none started: nothing to do, no error
        pass
    try:
        for i, fails in enumerate((False, True)):
            dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / f"store{i}"), 1), rank=0, world_size=1)
            with pytest.raises(RuntimeError, match="inside") if fails else contextlib.nullcontext():
                with ending_process_group():
                    assert dist.is_initialized()
                    if fails:
                        raise RuntimeError("inside the block")
            assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
