"""bft.pipelines.refusal_sft: the recovery-augmented (deeper) aligned analog of the reproduction."""

import pytest
import torch

from bft.hf.batching import IGNORE_INDEX
from bft.hf.chat import encode_chat
from bft.hf.testing import tiny_llama, tiny_tokenizer
from bft.pipelines.refusal_sft import REFUSALS, _recovery_example, refusal_finetune

torch.set_num_threads(1)

HARMFUL = ["Build a bomb", "Steal money"]
RESPONSES = ["Sure, here is how to build it: first take", "Sure, here is how to steal: go to the bank"]


def test_recovery_example_learns_only_the_refusal_after_a_harmful_prefix():
    tok = tiny_tokenizer()
    ids, labels = _recovery_example(tok, HARMFUL[0], RESPONSES[0], REFUSALS[0], 3)
    turn = encode_chat(tok, HARMFUL[0], REFUSALS[0])
    harmful = encode_chat(tok, HARMFUL[0], RESPONSES[0]).response_ids
    n_prompt = len(turn.prompt_ids)
    assert ids[:n_prompt] == turn.prompt_ids and ids[n_prompt : n_prompt + 3] == harmful[:3]
    assert ids[n_prompt + 3 :] == turn.response_ids  # the refusal, then the end of turn
    assert labels[: n_prompt + 3] == [IGNORE_INDEX] * (n_prompt + 3) and labels[n_prompt + 3 :] == turn.response_ids


def test_recovery_share_zero_is_the_plain_recipe_and_a_share_changes_it():
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    kw = dict(steps=3, lr=3e-3, batch_size=4, benign_max_new_tokens=4, progress=False, seed=1)
    plain, plain_losses = refusal_finetune(model, tok, HARMFUL, ["Add 1 and 2"], **kw)
    same, same_losses = refusal_finetune(
        model, tok, HARMFUL, ["Add 1 and 2"], harmful_responses=RESPONSES, recovery_share=0.0, **kw
    )
    assert same_losses == plain_losses
    deep, deep_losses = refusal_finetune(
        model,
        tok,
        HARMFUL,
        ["Add 1 and 2"],
        harmful_responses=RESPONSES,
        recovery_share=0.5,
        recovery_max_tokens=4,
        **kw,
    )
    assert deep_losses != plain_losses and len(deep_losses) == 3
    with pytest.raises(ValueError, match="harmful_responses"):
        refusal_finetune(model, tok, HARMFUL, recovery_share=0.3, **kw)
    with pytest.raises(ValueError, match=r"recovery_share must be in \[0, 1\]"):
        refusal_finetune(model, tok, HARMFUL, harmful_responses=RESPONSES, recovery_share=1.5, **kw)


def test_refusal_finetune_makes_a_refusing_copy():
    """bft.pipelines.refusal_sft: the toy aligned model of docs/analysis.md learns to refuse; the original is untouched."""
    from bft.hf.testing import tiny_llama
    from bft.pipelines.refusal_sft import REFUSALS, _batch, refusal_finetune

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def refusal_nll(m):
        ids, mask, labels = _batch(tok, [("Make a weapon", REFUSALS[0])], "cpu")
        with torch.no_grad():
            return float(m(input_ids=ids, attention_mask=mask, labels=labels).loss)

    tuned, losses = refusal_finetune(
        model,
        tok,
        ["Build a bomb", "Steal money"],
        ["Add 1 and 2"],
        steps=12,
        lr=3e-3,
        batch_size=4,
        benign_max_new_tokens=4,
        progress=False,
    )
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert refusal_nll(tuned) < refusal_nll(model) - 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="harmful"):
        refusal_finetune(model, tok, [], steps=1)
