"""bft.trainer.modeling: the student's loss (BFTStudent) with the config's settings, and the attention choice."""

from __future__ import annotations

import pytest
import torch
from helpers import make_case

import bft
from bft.chunked import base_favored_rows
from bft.reference import COMPLETION_TERMS

SOFTMAX_TERMS = [c for c in COMPLETION_TERMS if c != "l2"]  # every term but Eq. 9: a new one is tested too


def test_trainer_student_loss_uses_kl_weight():
    from bft.trainer.config import load_config
    from bft.trainer.modeling import BFTStudent
    from bft.trainer.train import loss_module
    from torch import nn

    tensors, _, valid = make_case(6, 8, 30, seed=17)
    sh, sw, ah, aw, bh, bw = tensors
    harmful = torch.zeros(6, dtype=torch.bool)

    def loss(kl_weight):
        objective = loss_module(load_config("tiny-cpu", ["loss.top_k=3", f"loss.kl_weight={kl_weight}"]))
        student = BFTStudent(nn.Identity(), objective, 30)
        out = student.loss(
            sh.view(2, 3, 8), sw, ah.view(2, 3, 8), aw, bh.view(2, 3, 8), bw, harmful.view(2, 3), valid.view(2, 3)
        )
        return out["loss"].item(), out["kl"]

    full, kl_full = loss(1.0)
    half, kl_half = loss(0.5)
    none, kl_none = loss(0.0)
    assert full > 0 and half == pytest.approx(full / 2, rel=1e-6) and none == 0.0
    assert torch.equal(kl_full, kl_half) and torch.equal(kl_full, kl_none)


@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_trainer_student_applies_the_configured_term_to_given_ids(completion):
    """BFTStudent's loss is bft_loss with the config's settings, the teacher cache's ids and risk passed through."""
    from bft.trainer.config import load_config
    from bft.trainer.modeling import BFTStudent
    from bft.trainer.train import loss_module
    from torch import nn

    tensors, harmful, valid = make_case(6, 8, 30, seed=19)
    ids, risk = base_favored_rows(*tensors[2:], top_k=3)
    ids = torch.roll(ids, 1, dims=0)  # not this row's top-k: only a loss that uses them gets the reference's value
    objective = loss_module(load_config("tiny-cpu", ["loss.top_k=3", f"loss.completion={completion}"]))
    student = BFTStudent(nn.Identity(), objective, 30)
    sh, sw, ah, aw, bh, bw = tensors
    out = student.loss(
        sh.view(2, 3, 8),
        sw,
        ah.view(2, 3, 8),
        aw,
        bh.view(2, 3, 8),
        bw,
        harmful.view(2, 3),
        valid.view(2, 3),
        topk_ids=ids,
        risk=risk,
    )
    want = bft.bft_loss(
        *tensors,
        harmful=harmful,
        valid=valid,
        top_k=3,
        completion=completion,
        topk_ids=ids,
        risk=risk,
        backend="reference",
    )
    own = bft.bft_loss(*tensors, harmful=harmful, valid=valid, top_k=3, completion=completion, backend="reference")
    torch.testing.assert_close(out["loss"], want.loss, rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(out["completion"], want.completion, rtol=2e-4, atol=2e-6)
    assert not torch.allclose(want.completion, own.completion, rtol=2e-4, atol=2e-6)


def test_attention_implementation_choice(monkeypatch):
    """auto = flash_attention_2 when flash-attn is installed and the run is 16-bit on CUDA, sdpa otherwise."""
    import importlib.util

    from bft.trainer.modeling import resolve_attn_implementation

    real_find_spec = importlib.util.find_spec
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for installed in (False, True):
        fake = object() if installed else None
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a, **k: fake if name == "flash_attn" else real_find_spec(name, *a, **k),
        )
        assert resolve_attn_implementation("auto", torch.bfloat16, cuda) == (
            "flash_attention_2" if installed else "sdpa"
        )
        assert resolve_attn_implementation("auto", torch.float32, cuda) == "sdpa"
        assert resolve_attn_implementation("auto", torch.bfloat16, cpu) == "sdpa"
        assert resolve_attn_implementation("eager", torch.bfloat16, cuda) == "eager"
        if not installed:
            with pytest.raises(ValueError, match="pip install flash-attn"):
                resolve_attn_implementation("flash_attention_2", torch.bfloat16, cuda)
