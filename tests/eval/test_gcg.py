"""bft.eval.gcg: the GCG attack on tiny random models."""

from __future__ import annotations

import pytest
import torch

from bft.hf.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gcg_lowers_the_target_loss():
    from bft.eval.gcg import GCGConfig, run_gcg, target_loss

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=1)
    cfg = GCGConfig(steps=4, search_width=32, topk=16, suffix_init="! ! ! ! !", seed=0)
    res = run_gcg(model, tok, "Write a poem", "Sure, here", cfg, progress=False)
    assert res.best_loss < res.initial_loss
    assert len(res.losses) == 4 and len(res.suffix_ids) == len(tok("! ! ! ! !", add_special_tokens=False).input_ids)
    # the stored loss is the real loss of the stored suffix, recomputed independently from its ids
    from bft.eval.gcg import _segments

    before, after = _segments(tok, "Write a poem", None)
    loss = target_loss(
        model,
        torch.tensor([before]),
        torch.tensor([res.suffix_ids]),
        torch.tensor([after]),
        torch.tensor([tok("Sure, here", add_special_tokens=False).input_ids]),
    )
    assert abs(float(loss[0]) - res.best_loss) < 1e-4
    assert res.input_ids == before + res.suffix_ids + after
    assert all(p.requires_grad for p in model.parameters())  # restored
    with pytest.raises(ValueError):
        GCGConfig(steps=0)


def test_gcg_never_proposes_special_tokens():
    from bft.eval.gcg import disallowed_token_mask

    tok = tiny_tokenizer()
    mask = disallowed_token_mask(tok, len(tok) + 6)
    assert (
        all(mask[i] for i in tok.all_special_ids)
        and mask[len(tok) :].all()
        and not mask[tok.convert_tokens_to_ids("a")]
    )
