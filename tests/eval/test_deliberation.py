"""bft.eval.deliberation: the deliberation classifier and its table."""

from __future__ import annotations

import pytest

from bft.eval.deliberation import deliberation_table, reasons_about_safety


def test_reasons_about_safety():
    assert reasons_about_safety("Sure, step 1... However, this is illegal and could cause serious harm.")
    assert reasons_about_safety("<think>Is this dangerous? yes</think> I cannot help.")
    assert not reasons_about_safety("Step 1: take the flour. Step 2: add water.")
    assert not reasons_about_safety("I'm sorry, I can't help with that.")


def test_deliberation_table():
    table = deliberation_table(
        ["It is illegal, but here", "Step 1", "That is dangerous. I won't.", "No."], [True, True, False, False]
    )
    assert (
        table["harmful+reasoning"],
        table["harmful+no_reasoning"],
        table["safe+reasoning"],
        table["safe+no_reasoning"],
    ) == (1, 1, 1, 1)
    assert table["total_harmful"] == 2 and table["share_reasoning"] == 0.5
    with pytest.raises(ValueError):
        deliberation_table(["a"], [])
