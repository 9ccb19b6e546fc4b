"""bft.trainer.data: the mixed harmful / utility batches."""

from __future__ import annotations

import math

import pytest
import torch


def test_mixed_batches_ratio_masks_and_determinism():
    from bft.trainer.data import Example, MixedBatches

    harmful = [Example((100 + i, 1, 2, 3, 4), response_start=3, harmful=True) for i in range(6)]
    utility = [Example((200 + i, 5, 6), response_start=1, harmful=False) for i in range(7)]
    batches = MixedBatches(harmful, utility, batch_size=5, harmful_ratio=0.4, seed=3, pad_id=0)
    assert batches.batches_per_epoch == 3  # 6 harmful rows at 2 per batch
    # each pass over the harmful stream sees every harmful example once, in a seeded order
    first_pass = [e.input_ids[0] for i in range(3) for e in batches.examples(i) if e.harmful]
    assert sorted(first_pass) == [100 + i for i in range(6)]
    # random access: batch i is a function of (seed, i) only
    again = MixedBatches(harmful, utility, batch_size=5, harmful_ratio=0.4, seed=3, pad_id=0)
    for i in (7, 2, 11, 0):
        for key in ("input_ids", "attention_mask", "valid", "harmful"):
            assert torch.equal(again[i][key], batches[i][key])
    other = MixedBatches(harmful, utility, batch_size=5, harmful_ratio=0.4, seed=4, pad_id=0)
    assert any(not torch.equal(other[i]["input_ids"], batches[i]["input_ids"]) for i in range(6))
    # the ratio is exact over any prefix of batches, also when B·r is not an integer
    odd = MixedBatches(harmful, utility, batch_size=5, harmful_ratio=0.3, seed=0, pad_id=0)
    counts = [sum(e.harmful for e in odd.examples(i)) for i in range(10)]
    assert all(len(odd.examples(i)) == 5 for i in range(10))
    assert [sum(counts[:n]) for n in range(1, 11)] == [math.floor(n * 5 * 0.3 + 1e-9) for n in range(1, 11)]
    # masks: valid = positions whose next token is a response token, harmful = the harmful rows only
    b = batches[0]
    assert b["n_tokens"] == int(b["attention_mask"].sum())
    for row, e in enumerate(batches.examples(0)):
        n = len(e.input_ids)
        expected_valid = [e.response_start - 1 <= t <= n - 2 for t in range(b["input_ids"].shape[1])]
        assert b["valid"][row].tolist() == expected_valid
        assert b["harmful"][row, :n].all().item() == e.harmful and not b["harmful"][row, n:].any()
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        assert (b["input_ids"][row, n:] == 0).all()
    with pytest.raises(ValueError, match="harmful_ratio"):
        MixedBatches(harmful, utility, batch_size=5, harmful_ratio=1.2, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="needs utility examples"):
        MixedBatches(harmful, [], batch_size=5, harmful_ratio=0.4, seed=0, pad_id=0)
