"""One config, two engines: ``train.engine: trl`` (TRL's trainer, :mod:`bft.integrations.trl`) trains exactly as
bft's own loop — per step, loss, kl, completion and grad_norm equal to 1e-5 relative — with LoRA and full
fine-tuning, live and from the teacher cache; a resumed TRL run equals a straight one. Tiny models, CPU, seconds."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")

import helpers
from bft.trainer.train import METRIC_KEYS, read_metrics, train
from helpers import harmful_rows, sum_rows, tiny_train_argv, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread", "no_telemetry")

STEP_KEYS = ("loss", "kl", "completion", "grad_norm")


@pytest.fixture(scope="module", autouse=True)
def no_telemetry():
    """TRL's trainers ping the Hub on construction (huggingface_hub's send_telemetry): never from the tests. The
    flag is read into huggingface_hub.constants at import time, so that is patched beside the variable."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl-data")
    return write_jsonl(root / "harmful.jsonl", harmful_rows()), write_jsonl(root / "utility.jsonl", sum_rows())


def tiny_config(data_files, output_dir, *overrides):
    return helpers.tiny_config(data_files, output_dir, "train.max_steps=4", "train.save_every=2", *overrides)


def run_trl(config, **kwargs):
    from bft.integrations.trl import train as trl_train

    return trl_train(config, progress=False, **kwargs)


def assert_same_steps(rows_bft, rows_trl):
    assert [r["step"] for r in rows_bft] == [r["step"] for r in rows_trl] == [1, 2, 3, 4]
    for a, b in zip(rows_bft, rows_trl):
        for key in STEP_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=0), (a["step"], key, a[key], b[key])
        assert b["lr"] == a["lr"] and b["epoch"] == pytest.approx(a["epoch"])


def final_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "model.safetensors"))


# a weight decay, a warmup and a decaying schedule, so the optimizer and scheduler mapping is exercised
SCHEDULE = ("optim.weight_decay=0.1", "optim.scheduler=cosine", "optim.warmup_steps=1")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trl_engine_equals_bft_engine(data_files, tmp_path, mode):
    overrides = (f"finetune.mode={mode}", *SCHEDULE)
    train(tiny_config(data_files, tmp_path / "bft", *overrides), progress=False)
    summary = run_trl(tiny_config(data_files, tmp_path / "trl", "train.engine=trl", *overrides))
    rows_bft, rows_trl = (
        read_metrics(tmp_path / "bft" / "metrics.jsonl"),
        read_metrics(tmp_path / "trl" / "metrics.jsonl"),
    )
    assert_same_steps(rows_bft, rows_trl)
    for row in rows_trl:  # the same metrics.jsonl keys
        assert set(METRIC_KEYS) <= set(row)
    assert summary["steps"] == 4 and summary["last_metrics"]["step"] == 4
    # the same output layout; final/ is a plain HF checkpoint (LoRA merged) holding the same weights
    assert (tmp_path / "trl" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "trl" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "trl" / "final")
    weights_bft, weights_trl = final_weights(tmp_path / "bft"), final_weights(tmp_path / "trl")
    assert weights_bft.keys() == weights_trl.keys()
    for name, tensor in weights_bft.items():
        torch.testing.assert_close(weights_trl[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trl_engine_equals_bft_engine_from_the_teacher_cache(data_files, tmp_path, mode):
    cache = f"teacher_cache.path={tmp_path / 'cache'}"  # built by the first run, read by both
    train(tiny_config(data_files, tmp_path / "bft", f"finetune.mode={mode}", cache), progress=False)
    run_trl(tiny_config(data_files, tmp_path / "trl", "train.engine=trl", f"finetune.mode={mode}", cache))
    assert_same_steps(
        read_metrics(tmp_path / "bft" / "metrics.jsonl"), read_metrics(tmp_path / "trl" / "metrics.jsonl")
    )


class Crash(RuntimeError):
    pass


def test_trl_resume_equals_a_straight_run(data_files, tmp_path):
    straight = tmp_path / "straight"
    run_trl(tiny_config(data_files, straight, "train.engine=trl", *SCHEDULE))

    def crash_at_3(step, metrics):
        if step == 3:
            raise Crash  # after step 3's metrics line, before any checkpoint of it: the run restarts from step 2

    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_trl(tiny_config(data_files, resumed, "train.engine=trl", *SCHEDULE), callbacks=[crash_at_3])
    with pytest.raises(ValueError, match="pass --resume"):
        run_trl(tiny_config(data_files, resumed, "train.engine=trl", *SCHEDULE))
    run_trl(tiny_config(data_files, resumed, "train.engine=trl", *SCHEDULE), resume=True)
    rows = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(read_metrics(straight / "metrics.jsonl"), rows):
        for key in (*STEP_KEYS, "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=0), (a["step"], key)


def test_cli_engine_trl(data_files, tmp_path, capsys):
    from bft.cli import main

    harmful, utility = data_files
    code = main(tiny_train_argv(tmp_path, harmful, utility, "--engine", "trl"))
    assert code == 0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "final" / "config.json").is_file()
    assert "trained 2 steps (engine trl)" in capsys.readouterr().out


def test_cli_unknown_engine_names_the_valid_ones(tmp_path, capsys):
    from bft.cli import console_main

    assert console_main(["train", "tiny-cpu", "--engine", "deepspeed", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.engine must be one of ['bft', 'trl']" in err and "deepspeed" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_engine_trl_without_trl_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    from bft.cli import console_main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    assert console_main(["train", "tiny-cpu", "--engine", "trl", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'bft[trl]'" in err[0], err


def test_bft_loop_refuses_engine_trl(data_files, tmp_path):
    with pytest.raises(ValueError, match="--engine trl"):
        train(tiny_config(data_files, tmp_path, "train.engine=trl"), progress=False)


def test_bft_config_holds_the_loss_settings_once():
    from bft.integrations.trl import BFTConfig
    from bft.loss import BFTLossParams

    def config(bft_loss):
        return BFTConfig(
            output_dir=os.devnull,
            bft_loss=bft_loss,
            activation_checkpointing=False,
            report_to="none",
            use_cpu=True,
            bf16=False,
        )

    args = config({"top_k": 7, "backend": "torch"})
    assert args.loss_settings.params == BFTLossParams(top_k=7) and args.loss_settings.backend == "torch"
    assert args.bft_objective().params == BFTLossParams(top_k=7)
    args = config(BFTLossParams(temperature=3.0))
    assert args.loss_settings.params.temperature == 3.0 and isinstance(args.bft_loss, dict)
    with pytest.raises(ValueError, match="top_k"):
        config({"top_k": 0})
