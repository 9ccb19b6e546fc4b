"""bft.eval.generation: batched plain / contrastive generation and its settings, on tiny random models."""

from __future__ import annotations

import pytest

from bft.eval.generation import GenerationSettings, generate_plain_or_contrastive
from bft.hf.testing import tiny_llama_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    return tiny_llama_pair(seed=0)


def test_batched_generation_matches_one_at_a_time(pair):
    base, aligned, tok = pair
    inputs = [
        tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").input_ids,
        tok("<|im_start|>user\nhello there, how are you<|im_end|>\n<|im_start|>assistant\nSure").input_ids,
    ]
    s = GenerationSettings(max_new_tokens=6, batch_size=2)
    batched = generate_plain_or_contrastive(aligned, tok, inputs, s, progress=False)
    one = GenerationSettings(max_new_tokens=6, batch_size=1)
    single = [generate_plain_or_contrastive(aligned, tok, [x], one, progress=False)[0] for x in inputs]
    assert batched == single
    # contrastive decoding with alpha = 0 is the aligned model
    assert generate_plain_or_contrastive(aligned, tok, inputs, s, base_model=base, alpha=0.0, progress=False) == batched
    with pytest.raises(ValueError, match="both"):
        generate_plain_or_contrastive(aligned, tok, inputs, s, base_model=base, progress=False)


def test_sampling_is_seeded(pair):
    _, aligned, tok = pair
    x = [tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").input_ids] * 2
    s = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.6, seed=3)
    first = generate_plain_or_contrastive(aligned, tok, x, s, progress=False)
    assert first == generate_plain_or_contrastive(aligned, tok, x, s, progress=False)


def test_settings_validation():
    with pytest.raises(ValueError):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationSettings(do_sample=True, top_p=0)
