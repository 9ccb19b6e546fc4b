"""``kl_weight``: row_loss_n = kl_weight·KL_n + harmful_n·α_n·completion_n, in every backend.

The oracle is written here in fp64 from two independent parts: the KL-only objective (the reference with
l2_reg = 0, the path every other test checks) and the completion term by hand (autograd through
l2_reg·Σ_{v∈M_n} s_v² with M_n and α_n from :func:`bft.base_favored_tokens`). Every backend must give
kl_weight·(KL part) + (completion part) for the loss and both gradients, keep reporting the unweighted KL,
equal its default bit for bit at kl_weight = 1, and have no gradient but the completion term's at kl_weight = 0.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEFAULTS, TRITON_DEVICE, assert_matches, delta_logits, make_case, run

import bft
from bft.chunked import base_favored_rows

BACKENDS = ["reference", "torch", "triton"]

# tiny odd shapes; each holds harmful, non-harmful and invalid rows (checked in the test)
CASES = {
    "forward": dict(N=9, H=8, V=67, top_k=5, seed=21),
    "reverse_odd": dict(N=7, H=5, V=131, top_k=3, seed=4, kl="reverse", teacher_lambda=1.5, temperature=1.5),
}


def split(case):
    spec = dict(CASES[case])
    return spec.pop("N"), spec.pop("H"), spec.pop("V"), spec.pop("seed"), spec


def completion_part(tensors, harmful, valid, *, top_k, l2_reg, alpha_base, gamma) -> dict:
    """loss, dh, dw of Σ_{n valid} harmful_n·α_n·completion_n / max(1, #valid) alone, in fp64, by hand."""
    sh, sw, ah, aw, bh, bw = (t.double() for t in tensors)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    s = sh @ sw.T
    favored = bft.base_favored_tokens(aligned_logits=ah @ aw.T, base_logits=bh @ bw.T, top_k=top_k)
    alpha = alpha_base * (1.0 + gamma * favored.count.double() / s.shape[-1])
    completion = l2_reg * torch.gather(s, -1, favored.ids).square().sum(-1)
    loss = (valid.double() * harmful.double() * alpha * completion).sum() / max(1, int(valid.sum()))
    loss.backward()
    return {"loss": loss.detach(), "dh": sh.grad, "dw": sw.grad}


def oracle(tensors, harmful, valid, kl_weight, **spec) -> dict:
    """fp64 loss and gradients at ``kl_weight`` = kl_weight·(KL-only objective) + (completion term)."""
    kw = {**DEFAULTS, **spec}
    kl_only = run(tensors, harmful, valid, "ref64", dtype=torch.float64, **{**kw, "l2_reg": 0.0})
    comp = completion_part(
        tensors, harmful, valid, top_k=kw["top_k"], l2_reg=kw["l2_reg"], alpha_base=kw["alpha_base"], gamma=kw["gamma"]
    )
    return {key: kl_weight * kl_only[key] + comp[key] for key in ("loss", "dh", "dw")}


def close(got, want, *, rtol=2e-4, atol=2e-5):
    for key in ("loss", "dh", "dw"):
        scale = want[key].abs().max().item()
        err = (got[key].cpu() - want[key].cpu()).abs().max().item()
        assert err <= atol + rtol * scale, f"{key}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_weighs_the_kl_term(case, kl_weight, backend):
    N, H, V, seed, spec = split(case)
    tensors, harmful, valid = make_case(N, H, V, seed=seed)
    assert (valid & harmful).any() and (valid & ~harmful).any() and (~valid).any()
    got = run(tensors, harmful, valid, backend, kl_weight=kl_weight, **spec)
    # against the fp64 oracle assembled from its two parts (at kl_weight = 0: the completion term's gradient alone)
    close(got, oracle(tensors, harmful, valid, kl_weight, **spec))
    # against the fp32 reference at the same kl_weight, every output
    ref = run(tensors, harmful, valid, "reference", kl_weight=kl_weight, **spec)
    assert_matches(got, ref, V=V, delta=delta_logits(tensors), valid=valid)
    # the reported per-row kl is the unweighted KL_n: the same bits as at the default weight
    default = run(tensors, harmful, valid, backend, **spec)
    for key in ("kl", "completion", "risk", "alpha", "topk_ids"):
        assert torch.equal(got[key], default[key]), key
    assert (got["kl"][valid] > 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kl_weight_with_given_base_favored_ids(backend):
    """The teacher-cache path (given topk_ids / risk; the Triton kernel compiled without its own top-k)."""
    N, H, V, seed, spec = split("forward")
    tensors, harmful, valid = make_case(N, H, V, seed=seed)
    ids, risk = base_favored_rows(*(t.float() for t in tensors[2:]), top_k=spec["top_k"])
    given = dict(topk_ids=ids.to(torch.int32), risk=risk)
    if backend == "triton":
        given = {k: v.to(TRITON_DEVICE) for k, v in given.items()}
    got = run(tensors, harmful, valid, backend, kl_weight=0.5, **given, **spec)
    ref = run(tensors, harmful, valid, "reference", kl_weight=0.5, topk_ids=ids, risk=risk, **spec)
    assert_matches(got, ref, V=V, delta=delta_logits(tensors), valid=valid)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_kl_weight_one_is_the_default_bit_for_bit(backend, kl):
    tensors, harmful, valid = make_case(6, 7, 53, seed=8)
    explicit = run(tensors, harmful, valid, backend, kl=kl, kl_weight=1.0, top_k=4)
    default = run(tensors, harmful, valid, backend, kl=kl, top_k=4)
    for key in default:
        assert torch.equal(explicit[key], default[key]), key
    assert explicit["loss"] != 0 and explicit["dh"].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_kl_weight_zero_without_harmful_rows_has_no_loss_and_no_gradient(backend, kl):
    """Completion only and nothing harmful: exactly zero loss and gradients, though the KL is reported."""
    tensors, harmful, valid = make_case(5, 6, 41, seed=9, p_harmful=0.0)
    assert not harmful.any()
    out = run(tensors, harmful, valid, backend, kl=kl, kl_weight=0.0, top_k=3)
    assert out["loss"].item() == 0.0
    assert torch.equal(out["dh"], torch.zeros_like(out["dh"]))
    assert torch.equal(out["dw"], torch.zeros_like(out["dw"]))
    assert (out["kl"][valid] > 0).all()


@pytest.mark.parametrize("value", [-0.5, -1e-12, float("nan"), float("inf"), True, "1", None])
def test_a_bad_kl_weight_is_refused(value):
    tensors, harmful, valid = make_case(4, 8, 30, seed=15)
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        bft.bft_loss(*tensors, harmful=harmful, valid=valid, top_k=5, kl_weight=value, backend="torch")
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        bft.BFTLoss(kl_weight=value)


def test_module_and_params_carry_kl_weight():
    tensors, harmful, valid = make_case(6, 8, 40, seed=16)
    module = bft.BFTLoss(top_k=5, kl_weight=0.25, backend="reference")
    assert "kl_weight=0.25" in repr(module)
    a = module(*tensors, harmful=harmful, valid=valid)
    b = bft.bft_loss(*tensors, harmful=harmful, valid=valid, top_k=5, kl_weight=0.25, backend="reference")
    assert torch.equal(a.loss, b.loss)
    assert bft.loss.BFTLossParams().kl_weight == 1.0
