"""bft.bft_loss with given base-favored ids and density (``topk_ids=``, ``risk=``, what a teacher cache holds).

Every backend must then skip its own top-k and count and compute the very same objective: against the reference
given the same ids (fp32; CCE's criterion in bf16), against the reference that finds them itself, and with ids
that are not the top-k at all (so a backend that recomputed them would fail).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEFAULTS, TRITON_DEVICE, assert_matches, cce_violations, delta_logits, make_case, run

import bft
from bft.chunked import base_favored_rows

BACKENDS = ["reference", "torch", "triton"]


def given_for(tensors, valid, top_k, *, garbage=True):
    """(topk_ids int32, risk fp32) of the aligned/base rows, with junk on the invalid rows (they must not be read)."""
    ah, aw, bh, bw = (t.float() for t in tensors[2:])
    ids, risk = base_favored_rows(ah, aw, bh, bw, top_k=top_k)
    ids, risk = ids.to(torch.int32), risk.clone()
    if garbage:
        ids[~valid] = -7
        risk[~valid] = 5.0
    return ids, risk


def on(backend, *xs):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    return [x.to(device) for x in xs]


CASES = {
    "basic": {"N": 21, "H": 16, "V": 500},
    "odd_vocab": {"N": 3, "H": 8, "V": 4099},
    "one_row": {"N": 1, "H": 8, "V": 257},
    "reverse_kl": {"N": 9, "H": 16, "V": 300, "kl": "reverse"},
    "k1": {"N": 6, "H": 8, "V": 211, "top_k": 1},
    "k_equals_v": {"N": 4, "H": 8, "V": 67, "top_k": 67},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_given_ids_fp32_match_the_reference(case, backend):
    spec = dict(CASES[case])
    N, H, V = spec.pop("N"), spec.pop("H"), spec.pop("V")
    top_k = spec.get("top_k", DEFAULTS["top_k"])
    tensors, harmful, valid = make_case(N, H, V, seed=len(case))
    ids, risk = given_for(tensors, valid, top_k)
    tensors = on(backend, *tensors)
    harmful, valid, ids_d, risk_d = on(backend, harmful, valid, ids, risk)
    own = run(tensors, harmful, valid, "reference", **spec)  # the reference finding the ids itself
    given_ref = run(tensors, harmful, valid, "reference", topk_ids=ids_d, risk=risk_d, **spec)
    fast = run(tensors, harmful, valid, backend, topk_ids=ids_d, risk=risk_d, **spec)
    delta = delta_logits([t.cpu() for t in tensors])
    assert_matches(fast, given_ref, V=V, delta=delta, valid=valid)
    assert_matches(fast, own, V=V, delta=delta, valid=valid)
    keep = valid.cpu()
    assert torch.equal(fast["topk_ids"].cpu()[keep], ids[keep].long())  # reported back as given
    assert (fast["topk_ids"].cpu()[~keep] == -1).all() and (fast["risk"].cpu()[~keep] == 0).all()
    assert torch.equal(fast["risk"].cpu()[keep].float(), risk[keep])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ids_that_are_not_the_topk_are_used_as_given(backend):
    """Random distinct ids and a made-up risk: the objective is computed on them, not on the top-k of Δ."""
    N, V, k = 11, 300, 9
    tensors, harmful, valid = make_case(N, 16, V, seed=5, p_harmful=0.7)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    risk = torch.rand(N, generator=g)
    tensors = on(backend, *tensors)
    harmful, valid, ids, risk = on(backend, harmful, valid, ids, risk)
    ref = run(tensors, harmful, valid, "reference", topk_ids=ids, risk=risk, top_k=k)
    fast = run(tensors, harmful, valid, backend, topk_ids=ids, risk=risk, top_k=k)
    own = run(tensors, harmful, valid, "reference", top_k=k)
    for key in ("loss", "completion", "alpha", "dh", "dw"):
        scale = ref[key].abs().max().item()
        assert (fast[key] - ref[key]).abs().max().item() <= 2e-5 + 2e-4 * scale, key
    assert not torch.allclose(ref["completion"], own["completion"])  # the case does tell the ids apart
    torch.testing.assert_close(fast["kl"], own["kl"], rtol=2e-4, atol=2e-5)  # the KL does not depend on them
    torch.testing.assert_close(fast["alpha"][valid], (1.0 + risk[valid]).double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_given_ids_bf16_no_worse_than_same_dtype_torch(backend, kl):
    tensors, harmful, valid = make_case(17, 32, 600, seed=9)
    tensors = [t.to(torch.bfloat16) for t in tensors]
    ids, risk = given_for(tensors, valid, DEFAULTS["top_k"])
    tensors = on(backend, *tensors)
    harmful, valid, ids, risk = on(backend, harmful, valid, ids, risk)
    given = {"topk_ids": ids, "risk": risk, "kl": kl}
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, **given)
    naive = run(tensors, harmful, valid, "ref_same", dtype=torch.bfloat16, **given)
    fast = run(tensors, harmful, valid, backend, dtype=torch.bfloat16, **given)
    assert not cce_violations(fast, naive, truth)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_given_ids_with_exact_ties_equal_the_backend_finding_them(backend):
    """Exact ties in Δ: the ids of the lower-id rule, given, reproduce the backend's own result exactly."""
    tensors, harmful, valid = make_case(9, 4, 150, seed=7, integer=True)
    ids, risk = given_for(tensors, valid, 20, garbage=False)
    tensors = on(backend, *tensors)
    harmful, valid, ids, risk = on(backend, harmful, valid, ids, risk)
    own = run(tensors, harmful, valid, backend, top_k=20)
    given = run(tensors, harmful, valid, backend, top_k=20, topk_ids=ids, risk=risk)
    assert torch.equal(own["topk_ids"], given["topk_ids"]) and torch.equal(own["risk"], given["risk"])
    for key in ("loss", "kl", "completion", "dh", "dw"):
        torch.testing.assert_close(given[key], own[key], rtol=1e-6, atol=1e-7)


def test_given_ids_bad_input_gets_a_clear_error():
    tensors, harmful, valid = make_case(4, 8, 50, seed=2, p_valid=1.0)
    ids, risk = given_for(tensors, valid, 5)

    def call(**kw):
        return bft.bft_loss(*tensors, harmful=harmful, valid=valid, top_k=5, backend="torch", **kw)

    with pytest.raises(ValueError, match="both topk_ids and risk"):
        call(topk_ids=ids)
    with pytest.raises(ValueError, match=r"topk_ids must have shape \[N=4, top_k=5\]"):
        call(topk_ids=ids[:, :4], risk=risk)
    with pytest.raises(ValueError, match="int32/int64"):
        call(topk_ids=ids.float(), risk=risk)
    with pytest.raises(ValueError, match=r"risk must be a float tensor of shape \[N=4\]"):
        call(topk_ids=ids, risk=risk[:3])
    bad = ids.clone()
    bad[1, 0] = 50
    with pytest.raises(ValueError, match=r"outside \[0, V=50\)"):
        call(topk_ids=bad, risk=risk)
    bad = ids.clone()
    bad[2, 1] = bad[2, 0]
    with pytest.raises(ValueError, match="repeats an id"):
        call(topk_ids=bad, risk=risk)
    with pytest.raises(ValueError, match=r"risk must lie in \[0, 1\]"):
        call(topk_ids=ids, risk=risk + 2)


def test_triton_row_kernel_given_variant_skips_the_count_and_the_topk():
    """Kernel 2 compiled with GIVEN: no base-favored count (reported −1) and the ids come back as given, while the
    per-row terms equal those of the variant that finds them."""
    from bft.kernels.bft_rows import bft_rows
    from bft.kernels.params import BFTLossParams

    tensors, harmful, _ = make_case(5, 8, 130, seed=4, p_harmful=1.0)
    ah, aw, bh, bw = tensors[2:]
    ids, risk = given_for(tensors, torch.ones(5, dtype=torch.bool), 6, garbage=False)
    S, A, B = tensors[0] @ tensors[1].T, ah @ aw.T, bh @ bw.T
    S, A, B, h8, ids, risk = on("triton", S, A, B, harmful.to(torch.int8), ids, risk)
    kw = {"params": BFTLossParams(top_k=6, l2_reg=0.01), "grad_scale": 0.2}
    G_own, G_given = torch.zeros_like(S), torch.zeros_like(S)
    own = bft_rows(S, A, B, G_own, h8, **kw)
    given = bft_rows(S, A, B, G_given, h8, topk_ids=ids, risk=risk, **kw)
    assert (given["count"] == -1).all() and (own["count"] >= 0).all()
    assert torch.equal(given["topk_ids"], ids.long()) and torch.equal(own["topk_ids"], ids.long())
    assert torch.equal(given["risk"], risk)
    for key in ("kl", "completion", "alpha", "row_loss"):
        torch.testing.assert_close(given[key], own[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(G_given, G_own, rtol=1e-6, atol=1e-7)
