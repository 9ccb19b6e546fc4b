"""bft.hf.testing: the tiny offline tokenizer and models."""

from __future__ import annotations

import string

import pytest
import torch

from bft.hf.chat import encode_chat
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
