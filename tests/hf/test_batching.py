"""bft.hf.batching: padding a batch of token ids."""

from __future__ import annotations

import pytest

from bft.hf.batching import pad_batch


def test_left_padding():
    ids, mask = pad_batch([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError):
        pad_batch([[1], []], 0, side="left")
