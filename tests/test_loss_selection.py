"""Where M is chosen (``selection=``, :data:`bft.kernels.params.SELECTION_RULES`).

- the rule "base_topp" (TopK(b − a, k) over the base model's top-p nucleus, grown in π_b order to k tokens) against
  a direct computation in plain Python (random rows, odd V, exact ties in b and in Δ, k = 1, p = 1);
- every fast backend against the reference under the rule (fp32: odd V, ties, ignored rows, two completion terms;
  ±1e3 logits and bf16 against fp64 truth), and that it selects other ids than "vocab" where the vocabulary's
  top-k is tail tokens;
- the validation messages, the Triton driver's refusal without ids, and the teacher cache fields (the trainer's config
  and the cache fingerprint under the rule: tests/trainer/test_config.py, test_cache_fingerprint.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from bft.kernels.params import SELECTION_RULES, BFTLossParams
from helpers import assert_matches, cce_violations, delta_logits, make_case, run

import bft
from bft.reference import base_favored_tokens, plausible_to_base, select_base_favored

pytestmark = pytest.mark.usefixtures("one_thread")


def direct_selection(a: torch.Tensor, b: torch.Tensor, k: int, p: float) -> list[list[int]]:
    """The rule written out in plain Python, in fp64: walk the base's tokens from the most probable (equal logits:
    lower id first), keep a token while the mass before it is < p or fewer than k are kept; then the k largest Δ
    among the kept tokens, equal Δ to the lower id."""
    out = []
    for a_row, b_row in zip(a.double().tolist(), b.double().tolist()):
        V = len(b_row)
        z = max(b_row)
        e = [math.exp(x - z) for x in b_row]
        total = sum(e)
        order = sorted(range(V), key=lambda v: (-b_row[v], v))
        kept, mass = [], 0.0
        for v in order:
            if mass < p or len(kept) < k:
                kept.append(v)
                mass += e[v] / total
            else:
                break
        delta = [b_row[v] - a_row[v] for v in range(V)]
        out.append(sorted(kept, key=lambda v: (-delta[v], v))[:k])
    return out


def rows(N, V, *, seed, integer=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact ties in b and in Δ = b − a
        return (torch.randint(-2, 3, (N, V), generator=g).double(), torch.randint(-2, 3, (N, V), generator=g).double())
    return torch.randn(N, V, generator=g, dtype=torch.float64) * scale, torch.randn(
        N, V, generator=g, dtype=torch.float64
    ) * scale


@pytest.mark.parametrize(
    "N, V, k, p, integer",
    [
        (6, 37, 5, 0.9, False),
        (6, 37, 5, 0.3, False),
        (4, 101, 1, 0.5, False),
        (5, 53, 12, 0.95, False),
        (6, 41, 4, 0.6, True),
        (6, 41, 9, 0.2, True),
    ],
)
def test_base_topp_matches_the_direct_computation(N, V, k, p, integer):
    a, b = rows(N, V, seed=V + k, integer=integer)
    ids = select_base_favored(b - a, b, k, "base_topp", p)
    assert ids.tolist() == direct_selection(a, b, k, p)
    # the same through the public function and in fp32 logits
    assert (
        base_favored_tokens(
            aligned_logits=a, base_logits=b, top_k=k, selection="base_topp", selection_top_p=p
        ).ids.tolist()
        == ids.tolist()
    )
    assert select_base_favored((b - a).float(), b.float(), k, "base_topp", p).tolist() == ids.tolist()


def test_the_nucleus_is_grown_to_k_and_p_one_is_the_whole_vocabulary():
    a, b = rows(3, 50, seed=1)
    b[:, 7] = 200.0  # one token holds all of the base's mass: its nucleus is that token alone
    keep = plausible_to_base(b, 0.5, 6)
    assert keep.sum(-1).tolist() == [6, 6, 6] and keep[:, 7].all()
    order = torch.sort(b, dim=-1, descending=True, stable=True).indices[:, :6]
    assert torch.equal(keep.gather(-1, order), torch.ones(3, 6, dtype=torch.bool))  # the base's six most probable
    a, b = rows(3, 50, seed=2)
    assert torch.equal(select_base_favored(b - a, b, 8, "base_topp", 1.0), select_base_favored(b - a, b, 8, "vocab"))


def test_base_topp_replaces_tail_tokens_that_vocab_picks():
    """The case the rule is for: the largest b − a sit on tokens the aligned model pushed far down and the base
    model gives no mass either; "vocab" picks them, "base_topp" picks among the base's likely tokens."""
    g = torch.Generator().manual_seed(3)
    V, k = 60, 4
    b = torch.randn(2, V, generator=g, dtype=torch.float64)
    b[:, :10] = 10.0  # the base's plausible tokens: ids 0-9, 0.1 of its mass each (the rest ~4e-4 in all)
    a = b.clone()
    a[:, 50:] -= 30.0  # the aligned model pushed ids 50-59 far down: the largest Δ, but π_b ~ e^-10 there
    a[:, :10] -= torch.linspace(0.0, 2.0, 10, dtype=torch.float64)  # mildly base-favored among the plausible
    vocab = select_base_favored(b - a, b, k, "vocab")
    topp = select_base_favored(b - a, b, k, "base_topp", 0.95)
    assert (vocab >= 50).all()
    assert (topp < 10).all() and topp.tolist() == [[9, 8, 7, 6]] * 2
    assert topp.tolist() == direct_selection(a, b, k, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# every fast backend against the reference under the rule

CASES = {
    "basic": {"N": 9, "H": 16, "V": 300},
    "odd_vocab": {"N": 3, "H": 8, "V": 1001},
    "ties": {"N": 7, "H": 4, "V": 150, "top_k": 20, "integer": True},
    "many_ignored": {"N": 10, "H": 8, "V": 120, "p_valid": 0.4},
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("completion", ["l2", "mass"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_backends_match_the_reference_under_base_topp(case, completion, backend):
    spec = dict(CASES[case])
    N, H, V = spec.pop("N"), spec.pop("H"), spec.pop("V")
    shape = {key: spec.pop(key) for key in ("integer", "p_valid") if key in spec}
    tensors, harmful, valid = make_case(N, H, V, seed=N + V, **shape)
    kw = {"top_k": 10, **spec, "completion": completion, "selection": "base_topp", "selection_top_p": 0.7}
    ref = run(tensors, harmful, valid, "reference", **kw)
    fast = run(tensors, harmful, valid, backend, **kw)
    assert_matches(fast, ref, V=V, delta=delta_logits(tensors), valid=valid)
    if case != "ties":  # under the rule M is not the vocabulary's top-k (so a backend ignoring it fails)
        vocab = run(tensors, harmful, valid, "reference", **{**kw, "selection": "vocab"})
        assert not torch.equal(vocab["topk_ids"], ref["topk_ids"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huge_logits_against_fp64_truth(backend):
    tensors, harmful, valid = make_case(5, 8, 211, seed=4)
    tensors = [t * (30.0 if i % 2 == 0 else 1.0) for i, t in enumerate(tensors)]  # |logits| ~ 1e3
    kw = {"top_k": 6, "completion": "mass", "selection": "base_topp", "selection_top_p": 0.9}
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, **kw)
    assert truth["loss"].abs().item() > 1e2  # the logits really are ~1e3
    fast = run(tensors, harmful, valid, backend, **kw)
    assert_matches(fast, truth, V=211, delta=delta_logits(tensors), valid=valid, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_against_fp64_truth(backend):
    tensors, harmful, valid = make_case(8, 16, 257, seed=5)
    xs = [t.bfloat16().float() for t in tensors]  # the bf16 values, exactly
    kw = {"top_k": 8, "completion": "unlikelihood", "selection": "base_topp", "selection_top_p": 0.8}
    truth = run(xs, harmful, valid, "ref64", dtype=torch.float64, **kw)
    naive = run(xs, harmful, valid, "ref_same", dtype=torch.bfloat16, **kw)
    fast = run(xs, harmful, valid, backend, dtype=torch.bfloat16, **kw)
    assert torch.equal(fast["topk_ids"], truth["topk_ids"])
    assert not cce_violations(fast, naive, truth)


# ---------------------------------------------------------------------------------------------------------------
# settings, refusal, the teacher cache fields (the trainer: tests/trainer/)


def test_selection_is_validated_naming_the_choices():
    assert SELECTION_RULES == ("vocab", "base_topp") and BFTLossParams().selection == "vocab"
    with pytest.raises(ValueError, match=r"selection must be one of \('vocab', 'base_topp'\), got 'nucleus'"):
        BFTLossParams(selection="nucleus")
    for bad in (0.0, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match=r"selection_top_p must be in \(0, 1\]"):
            BFTLossParams(selection="base_topp", selection_top_p=bad)
    with pytest.raises(ValueError, match="selection must be one of"):
        bft.BFTLoss(selection="top_p")


def test_the_triton_driver_refuses_the_rule_without_ids():
    from bft.kernels.bft_loss import bft_forward_backward_triton

    tensors, harmful, _ = make_case(3, 4, 20, seed=6)
    with pytest.raises(
        ValueError,
        match=r"selection='base_topp' needs precomputed top-k ids .*teacher cache \(bft "
        r"cache\) or pass topk_ids=",
    ):
        bft_forward_backward_triton(
            *tensors,
            harmful,
            params=BFTLossParams(selection="base_topp", top_k=3),
            scale=1.0,
            need_dh=False,
            need_dw=False,
        )


def test_the_teacher_cache_fields_name_the_rule():
    assert BFTLossParams(top_k=7).teacher_cache_fields() == {"top_k": 7}  # a cache built before the rule stays valid
    assert BFTLossParams(top_k=7, completion="mass", l2_reg=0.0).teacher_cache_fields() == {"top_k": 7}
    fields = BFTLossParams(top_k=7, selection="base_topp", selection_top_p=0.8).teacher_cache_fields()
    assert fields == {"top_k": 7, "selection": "base_topp", "selection_top_p": 0.8}
    assert BFTLossParams(top_k=7, selection="base_topp", selection_top_p=0.5).teacher_cache_fields() != fields
