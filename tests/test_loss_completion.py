"""The completion terms of bft.bft_loss (``completion=``, :data:`bft.COMPLETION_TERMS`) in every backend.

- every term × every fast backend against the reference: fp32 (odd V, ties, ignored rows, reverse KL, k = 1, given
  top-k ids, ±1e3 logits against fp64 truth), and bf16 with CCE's criterion against fp64 truth;
- the reference against the equations written out by hand in fp64, and its gradient against the closed forms of
  docs/loss.md;
- properties: adding a constant to a row of student logits changes neither the loss nor the gradients of "mass",
  "unlikelihood" and "log_mass" (it does change "l2"); a small step against the gradient lowers the student's
  probability mass on M, also where every logit of M is very negative, where "l2" raises it instead;
- "log_mass": its hinge is off (value and gradient 0) below completion_floor and at exactly it, and a plain step of
  a fixed size lowers a tiny mass on M by a large factor where "mass"'s gradient, proportional to that mass, barely
  moves it.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TRITON_DEVICE, assert_matches, cce_violations, delta_logits, make_case, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bft
from bft.chunked import base_favored_rows
from bft.reference import COMPLETION_TERMS

FAST = ["torch", "triton"]
SOFTMAX_TERMS = [c for c in COMPLETION_TERMS if c != "l2"]  # every term but Eq. 9: a new one is tested too


def on(backend, *xs):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    return [x.to(device) for x in xs]


def test_the_registry_names_four_terms_and_l2_stays_the_default():
    assert bft.COMPLETION_TERMS == ("l2", "mass", "unlikelihood", "log_mass")
    assert bft.loss.resolve_params(None, {}).completion == "l2"  # what bft_loss uses without completion=
    assert bft.loss.BFTLossParams().completion == "l2"
    assert bft.loss.BFTLossParams().completion_floor == 1e-6


# ---------------------------------------------------------------------------------------------------------------
# fp32: every term in every fast backend against the fp32 reference

CASES = {
    "basic": {"N": 13, "H": 16, "V": 300},
    "odd_vocab": {"N": 3, "H": 8, "V": 4099},
    "reverse_kl": {"N": 7, "H": 16, "V": 211, "kl": "reverse"},
    "k1": {"N": 5, "H": 8, "V": 101, "top_k": 1},
    "lambda_tau_gamma": {
        "N": 6,
        "H": 8,
        "V": 133,
        "teacher_lambda": 2.0,
        "temperature": 1.0,
        "gamma": 3.0,
        "alpha_base": 0.5,
    },
    "kl_weight_0": {"N": 6, "H": 8, "V": 133, "kl_weight": 0.0},
    "ties": {"N": 9, "H": 4, "V": 150, "top_k": 20, "integer": True},
    "many_ignored": {"N": 10, "H": 8, "V": 120, "p_valid": 0.4},
}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("completion", COMPLETION_TERMS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_term_matches_the_reference_fp32(case, completion, backend):
    spec = dict(CASES[case])
    N, H, V = spec.pop("N"), spec.pop("H"), spec.pop("V")
    build = {key: spec.pop(key) for key in ("integer", "p_valid") if key in spec}
    tensors, harmful, valid = make_case(N, H, V, seed=len(case) + 7, **build)
    ref = run(tensors, harmful, valid, "reference", completion=completion, **spec)
    fast = run(tensors, harmful, valid, backend, completion=completion, **spec)
    assert_matches(fast, ref, V=V, delta=delta_logits(tensors), valid=valid)
    assert (ref["completion"][valid] > 0).all()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_given_topk_ids_are_used_as_given(completion, backend):
    """Given ids that are not the top-k of Δ (random distinct ids, made-up risk): the term is computed on them."""
    N, V, k = 9, 240, 8
    tensors, harmful, valid = make_case(N, 16, V, seed=5, p_harmful=0.7)
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).to(torch.int32)
    risk = torch.rand(N, generator=g)
    ids[~valid], risk[~valid] = -7, 5.0  # junk on ignored rows: never read
    tensors = on(backend, *tensors)
    harmful, valid, ids, risk = on(backend, harmful, valid, ids, risk)
    given = {"topk_ids": ids, "risk": risk, "top_k": k, "completion": completion}
    ref = run(tensors, harmful, valid, "reference", **given)
    fast = run(tensors, harmful, valid, backend, **given)
    own = run(tensors, harmful, valid, "reference", top_k=k, completion=completion)
    assert_matches(fast, ref, V=V, delta=delta_logits([t.cpu() for t in tensors]), valid=valid.cpu())
    assert not torch.allclose(ref["completion"], own["completion"])  # the case does tell the ids apart


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_given_topk_ids_equal_the_backend_finding_them(completion, backend):
    """The teacher cache's ids and risk (bft.chunked.base_favored_rows) reproduce the backend's own result."""
    tensors, harmful, valid = make_case(8, 8, 190, seed=11)
    ids, risk = base_favored_rows(*tensors[2:], top_k=9)
    tensors = on(backend, *tensors)
    harmful, valid, ids, risk = on(backend, harmful, valid, ids, risk)
    own = run(tensors, harmful, valid, backend, top_k=9, completion=completion)
    cached = run(tensors, harmful, valid, backend, top_k=9, completion=completion, topk_ids=ids, risk=risk)
    for key in ("loss", "kl", "completion", "dh", "dw"):
        torch.testing.assert_close(cached[key], own[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_ignored_rows_are_ignored_whatever_they_hold(completion, backend):
    tensors, harmful, valid = make_case(9, 8, 64, seed=16, p_valid=0.5)
    clean = run(tensors, harmful, valid, backend, completion=completion)
    dirty = [t.clone() for t in tensors]
    for i, garbage in ((0, float("nan")), (2, float("inf")), (4, 1e30)):
        dirty[i][~valid] = garbage
    out = run(dirty, harmful ^ ~valid, valid, backend, completion=completion)
    for key in ("loss", "kl", "completion", "risk", "alpha", "topk_ids", "dw"):
        assert torch.equal(out[key], clean[key]), key
    assert torch.equal(out["dh"][valid], clean["dh"][valid]) and (out["dh"][~valid] == 0).all()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_large_logits_do_not_overflow(completion, kl, backend):
    """|logits| ~ 10³: softmaxes are one-hot, M often holds the row's argmax (P = 1 in fp32), yet "unlikelihood"
    stays finite and exact (its complement's log-sum-exp is computed directly, never from 1 − P).

    kl_weight = 0 keeps the KL out of the gradients: there, the triton kernel's reverse-KL gradient at the argmax is
    a difference of two ~2600-nat quantities and lands ~0.05 off the fp64 truth (the torch backend ~1e-3), which
    test_loss.py's version of this test does not see next to the L2 term's gradients of ~10³."""
    tensors, harmful, valid = make_case(7, 16, 500, seed=8, scale=1000.0, p_harmful=1.0)
    kw = {"kl": kl, "completion": completion, "kl_weight": 0.0}
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, **kw)
    out = run(tensors, harmful, valid, backend, **kw)
    for key in ("loss", "kl", "completion", "dh", "dw"):
        assert torch.isfinite(out[key]).all(), key
        scale = truth[key].abs().max().item()
        assert (out[key] - truth[key]).abs().max().item() <= 1e-4 * scale + 1e-6, key
    if completion == "unlikelihood":  # some rows have P ≈ 1, where −log(1 − P) in fp32 would be infinite
        assert (truth["completion"][valid] > 20).any()


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_mass_with_m_the_whole_vocabulary_is_one_and_unlikelihood_is_refused(backend):
    tensors, harmful, valid = make_case(4, 8, 40, seed=3, p_harmful=1.0)
    out = run(tensors, harmful, valid, backend, top_k=40, completion="mass")
    kl_only = run(tensors, harmful, valid, "reference", top_k=40, kl_weight=1.0, alpha_base=0.0, completion="mass")
    torch.testing.assert_close(out["completion"][valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    for key in ("dh", "dw"):  # P ≡ 1 has no gradient: only the KL's remains
        torch.testing.assert_close(out[key], kl_only[key], rtol=2e-4, atol=2e-6)
    with pytest.raises(ValueError, match=r"completion='unlikelihood' needs top_k < V=40"):
        bft.bft_loss(*tensors, harmful=harmful, valid=valid, top_k=40, completion="unlikelihood", backend=backend)


@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_without_gradients_the_values_are_the_same(completion):
    """Under no_grad the row kernel has no pass 3; the torch backend skips the dense gradient."""
    tensors, harmful, valid = make_case(6, 8, 150, seed=12)
    ref = run(tensors, harmful, valid, "reference", completion=completion)
    for backend in FAST:
        xs = on(backend, *tensors)
        h, v = on(backend, harmful, valid)
        with torch.no_grad():
            out = bft.bft_loss(*xs, harmful=h, valid=v, backend=backend, completion=completion, top_k=7)
        for key in ("loss", "completion", "kl"):
            torch.testing.assert_close(getattr(out, key).double().cpu(), ref[key], rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("completion", COMPLETION_TERMS)
def test_triton_row_kernel_leaves_the_student_logits_as_given(completion, with_grad):
    """The softmax terms hide s at M (−inf) inside the kernel while it runs; the block S must come back intact."""
    from bft.kernels.bft_rows import bft_rows
    from bft.kernels.params import BFTLossParams

    tensors, harmful, _ = make_case(5, 8, 130, seed=4, p_harmful=1.0)
    S, A, B = (h @ w.T for h, w in zip(tensors[::2], tensors[1::2]))
    S, A, B, h8 = on("triton", S, A, B, harmful.to(torch.int8))
    before = S.clone()
    G = torch.zeros_like(S) if with_grad else None
    params = BFTLossParams(top_k=6, l2_reg=0.01, kl="reverse", completion=completion)
    out = bft_rows(S, A, B, G, h8, params=params, grad_scale=0.2)
    assert torch.equal(S, before)
    assert torch.isfinite(out["completion"]).all() and (G is None or torch.isfinite(G).all())


# ---------------------------------------------------------------------------------------------------------------
# 16-bit inputs: CCE's criterion against fp64 truth


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("completion", SOFTMAX_TERMS)  # "l2": tests/test_loss.py (bf16 and fp16)
def test_bf16_inputs_are_no_worse_than_same_dtype_torch(completion, kl, backend):
    tensors, harmful, valid = make_case(23, 32, 777, seed=9)
    tensors = [t.to(torch.bfloat16) for t in tensors]
    kw = {"kl": kl, "completion": completion}
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, **kw)
    naive = run(tensors, harmful, valid, "ref_same", dtype=torch.bfloat16, **kw)
    fast = run(tensors, harmful, valid, backend, dtype=torch.bfloat16, **kw)
    assert not cce_violations(fast, naive, truth)
    assert completion_close(fast, truth)


def completion_close(fast, truth) -> bool:
    """The term's value within fp32 accumulation error of the truth. CCE's criterion alone is lenient here: bf16 torch
    computes "unlikelihood" as a difference of two bf16 log-sum-exps and is off by ~100% (0.03 on 0.03)."""
    scale = truth["completion"].abs().max().item()
    return (fast["completion"] - truth["completion"]).abs().max().item() <= 1e-4 * scale + 1e-7


@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_the_bf16_criterion_catches_a_wrong_term(completion):
    """The checks can fail on the completion key: a term 1% off is caught, and so is "unlikelihood" computed where
    "mass" was asked for (the two differ by ~P²/2, P ≈ 0.03 here)."""
    tensors, harmful, valid = make_case(23, 32, 777, seed=9, p_harmful=1.0)
    tensors = [t.to(torch.bfloat16) for t in tensors]
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, completion=completion)
    naive = run(tensors, harmful, valid, "ref_same", dtype=torch.bfloat16, completion=completion)
    right = run(tensors, harmful, valid, "torch", dtype=torch.bfloat16, completion=completion)
    assert not cce_violations(right, naive, truth)
    off = {**right, "completion": right["completion"] * 1.01}
    assert completion_close(right, truth) and not completion_close(off, truth)
    if completion == "mass":
        assert [v.split(":")[0] for v in cce_violations(off, naive, truth)] == ["completion"]
    if completion == "mass":
        confused = run(tensors, harmful, valid, "torch", dtype=torch.bfloat16, completion="unlikelihood")
        assert "completion" in {v.split(":")[0] for v in cce_violations(confused, naive, truth)}


# ---------------------------------------------------------------------------------------------------------------
# the reference against the equations by hand, and its gradients against the closed forms of docs/loss.md


@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_reference_matches_hand_written_equations(completion):
    tensors, harmful, valid = make_case(4, 8, 50, seed=12)
    assert not valid.all() and valid.any() and harmful[valid].any()
    out = run(tensors, harmful, valid, "ref64", dtype=torch.float64, completion=completion)
    sh, sw, ah, aw, bh, bw = (t.double() for t in tensors)
    s, a, b = sh @ sw.T, ah @ aw.T, bh @ bw.T
    for n in valid.nonzero().flatten().tolist():
        delta = b[n] - a[n]
        top = sorted(range(50), key=lambda v: (-delta[v].item(), v))[:7]
        z = sum(torch.exp(s[n, v]).item() for v in range(50))
        mass = sum(torch.exp(s[n, v]).item() for v in top) / z
        want = {
            "mass": mass,
            "unlikelihood": -torch.log1p(torch.tensor(-mass, dtype=torch.float64)).item(),
            "log_mass": max(0.0, math.log(mass) - math.log(1e-6)),
        }[completion]
        assert out["completion"][n].item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("completion", COMPLETION_TERMS)
def test_reference_gradient_is_the_documented_closed_form(completion):
    """∂/∂s_j: "l2" 2·l2_reg·s_j·1[j∈M]; "mass" π_j(1[j∈M] − P); "unlikelihood" π_j(1[j∈M] − P)/(1 − P);
    "log_mass" 1[P > p_floor]·(1[j∈M]·softmax(s_M)_j − π_j) (p_floor = 0.05 here: some rows are below it)."""
    from bft.reference import completion_values

    g = torch.Generator().manual_seed(3)
    s = (3 * torch.randn(8, 40, generator=g, dtype=torch.float64)).requires_grad_(True)
    ids = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(8)])
    completion_values(s, ids, completion=completion, l2_reg=0.3, completion_floor=0.05).sum().backward()
    x = s.detach()
    in_m = torch.zeros_like(x).scatter_(1, ids, 1.0)
    pi = torch.softmax(x, 1)
    P = (pi * in_m).sum(1, keepdim=True)
    r = torch.softmax(x.masked_fill(in_m == 0, float("-inf")), 1)  # softmax over M
    on = (P > 0.05).double()
    assert 0 < on.sum() < 8  # the hinge is on in some rows and off in others
    want = {
        "l2": 2 * 0.3 * x * in_m,
        "mass": pi * (in_m - P),
        "unlikelihood": pi * (in_m - P) / (1 - P),
        "log_mass": on * (r - pi),
    }
    torch.testing.assert_close(s.grad, want[completion])
    wrong = {
        "l2": pi * (in_m - P),
        "mass": 2 * 0.3 * x * in_m,
        "unlikelihood": pi * (in_m - P),
        "log_mass": r - pi,  # without the hinge
    }
    assert not torch.allclose(s.grad, wrong[completion])  # the closed forms are told apart


# ---------------------------------------------------------------------------------------------------------------
# properties: which way each term pulls


def shifted(tensors, shift):
    """The same case with ``shift[n]`` added to every student logit of row n: an extra hidden unit holding shift[n]
    and a head column of ones (s' = [h, c]·[W, 1]ᵀ = s + c)."""
    sh, sw = tensors[0], tensors[1]
    return [torch.cat([sh, shift[:, None]], 1), torch.cat([sw, torch.ones(sw.shape[0], 1)], 1), *tensors[2:]]


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("completion", COMPLETION_TERMS)
def test_a_constant_added_to_a_row_changes_nothing_but_l2(completion, backend):
    N, H, V = 7, 8, 160
    tensors, harmful, valid = make_case(N, H, V, seed=21, p_harmful=1.0)
    zero = run(shifted(tensors, torch.zeros(N)), harmful, valid, backend, completion=completion)
    moved = run(
        shifted(tensors, torch.tensor([40.0, -40.0, 7.0, -3.0, 15.0, -25.0, 1.0])),
        harmful,
        valid,
        backend,
        completion=completion,
    )
    same = []
    for key, cut in (
        ("loss", None),
        ("completion", None),
        ("kl", None),
        ("dh", (slice(None), slice(0, H))),
        ("dw", (slice(None), slice(0, H))),
    ):
        a, b = (zero[key], moved[key]) if cut is None else (zero[key][cut], moved[key][cut])
        # s + c is rounded at |c|·2⁻²⁴ ≈ 2.4e-6 (c = 40), so values and gradients move by about that much
        same.append(torch.allclose(a, b, rtol=1e-4, atol=2e-5 * max(1.0, a.abs().max().item())))
    if completion == "l2":
        assert not any(same[:2])  # the comparison can fail: Σ s_v² moves with the row
    else:
        assert all(same)
        assert (zero["completion"][valid] > 0).all()  # "log_mass": its hinge is on, the gradients are not 0


def pull_case(rows_m: list[float], V=64, k=5, seed=0):
    """Logits given directly (identity heads, H = V), so d loss/d student_hidden is d loss/ds. Row n's M is a
    known set of k ids (Δ = b − a is large there) where the student's logits are ``rows_m[n]`` (None: random)."""
    g = torch.Generator().manual_seed(seed)
    N = len(rows_m)
    a = torch.randn(N, V, generator=g)
    s = a + 0.5 * torch.randn(N, V, generator=g)
    b = a + 0.1 * torch.randn(N, V, generator=g)
    m = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    b.scatter_add_(1, m, torch.full((N, k), 8.0))
    for n, level in enumerate(rows_m):
        if level is not None:
            s[n, m[n]] = level + 0.3 * torch.randn(k, generator=g)
    eye = torch.eye(V)
    return [s, eye, a, eye.clone(), b, eye.clone()], m


def mass_on(s, m):
    return torch.softmax(s.double(), 1).gather(1, m).sum(1)


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("completion", COMPLETION_TERMS)
def test_a_small_step_against_the_gradient_moves_the_mass_on_m(completion, backend):
    """Row 0-1: every logit of M at about −30 (mass ~1e-13), the case Eq. 9's L2 gets backwards; row 2: random;
    row 3: M at +8 (most of the mass). Only the completion term acts (kl_weight = 0, every row harmful). A step of
    0.1 against each row's gradient must lower the student's mass on M everywhere for the softmax terms
    ("log_mass" with a floor of 1e-30, below every row's mass); "l2" raises the very negative logits of M, and with
    them the mass."""
    levels = [-30.0, -30.0, None, 8.0]
    tensors, m = pull_case(levels, seed=4)
    N = len(levels)
    harmful, valid = torch.ones(N, dtype=torch.bool), torch.ones(N, dtype=torch.bool)
    out = run(tensors, harmful, valid, backend, top_k=5, kl_weight=0.0, completion=completion, completion_floor=1e-30)
    assert torch.equal(out["topk_ids"].sort(1).values, m.sort(1).values)  # M is the set the case built
    s, g = tensors[0].double(), out["dh"]
    step = s - 0.1 * g / g.norm(dim=1, keepdim=True)
    before, after = mass_on(s, m), mass_on(step, m)
    if completion == "l2":
        assert (after[:2] > before[:2]).all()  # raised: Eq. 9 pulls negative logits up, towards 0
        assert ((step - s).gather(1, m)[:2] > 0).all()
        assert after[3] < before[3]  # where M's logits are positive it does push them down
    else:
        assert (after < before).all(), (before, after)
        assert ((step - s).gather(1, m) < 0).all()  # every logit of M is lowered...
        assert (after[:2] / before[:2] < 0.99).all()  # ...by a visible amount, though its mass is ~1e-13


@pytest.mark.parametrize("completion", SOFTMAX_TERMS)
def test_the_pull_test_can_fail(completion):
    """The same check on the negated gradient (an ascent step) fails: the test tells the directions apart."""
    tensors, m = pull_case([-30.0, None, 8.0], seed=4)
    out = run(
        tensors,
        torch.ones(3, dtype=torch.bool),
        torch.ones(3, dtype=torch.bool),
        "reference",
        top_k=5,
        kl_weight=0.0,
        completion=completion,
        completion_floor=1e-30,
    )
    s, g = tensors[0].double(), out["dh"]
    ascent = s + 0.1 * g / g.norm(dim=1, keepdim=True)
    assert (mass_on(ascent, m) > mass_on(s, m)).all()


# ---------------------------------------------------------------------------------------------------------------
# "log_mass": a hinge at completion_floor, and a pull that does not vanish with M's mass


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_log_mass_is_off_below_the_floor(backend):
    """Rows 0-1 hold ~1e-14 of their mass on M, below the default floor 1e-6: value 0 and gradient exactly 0 (only
    the completion term acts); rows 2-3 are above it. With a floor of 1e-20 the same rows 0-1 are on again."""
    tensors, m = pull_case([-30.0, -30.0, None, 8.0], seed=4)
    mass = mass_on(tensors[0], m)
    assert (mass[:2] < 1e-6).all() and (mass[2:] > 1e-6).all()
    ones = torch.ones(4, dtype=torch.bool)
    kw = {"top_k": 5, "kl_weight": 0.0, "completion": "log_mass"}
    out = run(tensors, ones, ones, backend, **kw)
    assert (out["completion"][:2] == 0).all() and (out["dh"][:2] == 0).all()
    torch.testing.assert_close(out["completion"][2:], (mass[2:] / 1e-6).log(), rtol=1e-5, atol=1e-5)
    assert (out["dh"][2:].abs().sum(1) > 1e-3).all()  # row 3 (P ≈ 1): the L1 norm is 2·Q·α/N, small but not 0
    lower = run(tensors, ones, ones, backend, completion_floor=1e-20, **kw)
    torch.testing.assert_close(lower["completion"], (mass / 1e-20).log(), rtol=1e-5, atol=1e-4)
    assert (lower["dh"][:2].abs().sum(1) > 0.1).all()  # the check can fail: the hinge is what zeroes rows 0-1


@pytest.mark.parametrize("backend", ["ref64", "reference", *FAST])
def test_log_mass_at_exactly_the_floor_takes_the_subgradient_0(backend):
    """Equal logits over V = 4 with M two of them: P = 1/2 exactly, so at p_floor = 1/2 log P − log p_floor is exactly
    0 (checked in fp64) and the gradient is 0; just below (p_floor = 0.49) it is not."""
    V = 4
    s, a, b = torch.zeros(2, V), torch.zeros(2, V), torch.zeros(2, V)
    b[:, :2] = 5.0  # M = {0, 1}
    eye = torch.eye(V)
    tensors = [s, eye, a, eye.clone(), b, eye.clone()]
    assert torch.logsumexp(s[0, :2].double(), 0) - torch.logsumexp(s[0].double(), 0) - math.log(0.5) == 0
    ones = torch.ones(2, dtype=torch.bool)
    dtype = {"dtype": torch.float64} if backend == "ref64" else {}
    kw = {"top_k": 2, "kl_weight": 0.0, "completion": "log_mass", **dtype}
    at = run(tensors, ones, ones, backend, completion_floor=0.5, **kw)
    assert (at["completion"] == 0).all() and (at["dh"] == 0).all() and (at["dw"] == 0).all()
    below = run(tensors, ones, ones, backend, completion_floor=0.49, **kw)
    torch.testing.assert_close(below["completion"], torch.full((2,), math.log(0.5 / 0.49), dtype=torch.float64))
    assert (below["dh"].abs().amax(1) > 0.1).all()


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_log_mass_pulls_a_tiny_mass_down_where_mass_barely_moves_it(backend):
    """Every logit of M at about −10 (M holds ~1e-6 of each row's mass, above the floor 1e-12 set here): one plain
    step s − lr·∂loss/∂s with lr = 1 lowers that mass by > 5% under "log_mass", whose gradient on M is
    softmax(s_M)·Q ≈ 1/k per id; under "mass" and "unlikelihood", whose gradients are proportional to the mass, the
    same step lowers it by less than 1e-4 of itself."""
    tensors, m = pull_case([-10.0, -10.0, -10.0], seed=7)
    before = mass_on(tensors[0], m)
    assert (before > 1e-12).all() and (before < 1e-5).all()
    ones = torch.ones(3, dtype=torch.bool)
    ratio = {}
    for completion in SOFTMAX_TERMS:
        out = run(tensors, ones, ones, backend, top_k=5, kl_weight=0.0, completion=completion, completion_floor=1e-12)
        ratio[completion] = mass_on(tensors[0].double() - out["dh"], m) / before
    assert (ratio["log_mass"] < 0.95).all(), ratio
    for completion in ("mass", "unlikelihood"):
        assert (ratio[completion] < 1).all() and (ratio[completion] > 1 - 1e-4).all(), ratio


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_log_mass_with_m_the_whole_vocabulary_is_minus_log_floor_without_gradient(backend):
    tensors, harmful, valid = make_case(4, 8, 40, seed=3, p_harmful=1.0)
    out = run(tensors, harmful, valid, backend, top_k=40, completion="log_mass", completion_floor=1e-3)
    kl_only = run(tensors, harmful, valid, "reference", top_k=40, alpha_base=0.0, completion="log_mass")
    torch.testing.assert_close(
        out["completion"][valid], torch.full((int(valid.sum()),), -math.log(1e-3), dtype=torch.float64)
    )
    for key in ("dh", "dw"):  # log P ≡ 0 has no gradient: only the KL's remains
        torch.testing.assert_close(out[key], kl_only[key], rtol=2e-4, atol=2e-6)


def test_completion_floor_is_validated_wherever_it_is_given():
    tensors, _, _ = make_case(3, 4, 20, seed=1)
    for floor in (0, 1, 1.5, -0.1, float("inf"), None):
        with pytest.raises(ValueError, match="completion_floor must be a probability in"):
            bft.bft_loss(*tensors, top_k=3, completion="log_mass", completion_floor=floor, backend="reference")
    with pytest.raises(ValueError, match="completion_floor must be a probability in"):
        bft.BFTLoss(completion_floor=0.0)
    assert bft.BFTLoss(completion="log_mass", completion_floor=1e-9).params.completion_floor == 1e-9


# ---------------------------------------------------------------------------------------------------------------
# fuzzing small shapes, and bad input


@st.composite
def small_problems(draw):
    V = draw(st.integers(3, 40))
    return {
        "N": draw(st.integers(1, 5)),
        "H": draw(st.integers(1, 6)),
        "V": V,
        "seed": draw(st.integers(0, 10_000)),
        "top_k": draw(st.integers(1, V - 1)),
        "kl": draw(st.sampled_from(["forward", "reverse"])),
        "scale": draw(st.sampled_from([0.1, 3.0, 30.0])),
        "completion": draw(st.sampled_from(SOFTMAX_TERMS)),
    }


def _fuzz(problem, backend):
    p = dict(problem)
    tensors, harmful, valid = make_case(p.pop("N"), p.pop("H"), p.pop("V"), seed=p.pop("seed"), scale=p.pop("scale"))
    ref = run(tensors, harmful, valid, "reference", **p)
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, **p)
    fast = run(tensors, harmful, valid, backend, **p)
    for key in ("loss", "kl", "completion", "dh", "dw"):
        scale = truth[key].abs().max().item()
        err = (fast[key] - truth[key]).abs().max().item()
        ref_err = (ref[key] - truth[key]).abs().max().item()
        assert err <= 4 * ref_err + 2e-5 + 2e-4 * scale, f"{key}: error {err:.3g}, fp32 reference {ref_err:.3g}"


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_fuzz_torch_backend(problem):
    _fuzz(problem, "torch")


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_fuzz_triton_backend(problem):
    _fuzz(problem, "triton")


def test_an_unknown_term_is_refused_naming_the_valid_ones():
    tensors, _, _ = make_case(3, 4, 20, seed=1)
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=r"completion must be one of \('l2', 'mass', 'unlikelihood', 'log_mass'\)"):
            bft.bft_loss(*tensors, top_k=3, completion="logit", backend=backend)
    with pytest.raises(ValueError, match="completion must be one of"):
        bft.BFTLoss(completion="L2")


# ---------------------------------------------------------------------------------------------------------------
# one settings object: bft.loss.BFTLossParams, from bft_loss / BFTLoss down to the row kernel


def test_params_object_equals_the_keywords_and_refuses_both():
    from bft.loss import BFTLossParams

    tensors, harmful, valid = make_case(5, 8, 90, seed=6)
    params = BFTLossParams(top_k=6, temperature=1.5, kl="reverse", completion="unlikelihood", alpha_base=0.7)
    for backend in ("reference", "torch"):
        a = bft.bft_loss(*tensors, harmful=harmful, valid=valid, params=params, backend=backend)
        b = bft.bft_loss(*tensors, harmful=harmful, valid=valid, backend=backend, **params.as_kwargs())
        assert torch.equal(a.loss, b.loss) and torch.equal(a.completion, b.completion)
    with pytest.raises(ValueError, match="either as params= or as keywords, not both.*completion"):
        bft.bft_loss(*tensors, params=params, completion="mass")
    with pytest.raises(ValueError, match="either as params= or as keywords"):
        bft.BFTLoss(params, top_k=3)
    with pytest.raises(ValueError, match="params must be a bft.loss.BFTLossParams"):
        bft.bft_loss(*tensors, params=params.as_kwargs())
    # a misspelt setting is named with the valid ones, never silently dropped (each is declared once, in BFTLossParams)
    with pytest.raises(ValueError, match=r"unknown loss setting\(s\) topk; the settings are top_k, temperature"):
        bft.bft_loss(*tensors, topk=5)
    with pytest.raises(ValueError, match=r"unknown loss setting\(s\) lambda_"):
        bft.BFTLoss(lambda_=1.2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"completion": "l1"}, r"completion must be one of \('l2', 'mass', 'unlikelihood', 'log_mass'\), got 'l1'"),
        ({"kl": "both"}, r"kl must be one of \('forward', 'reverse'\)"),
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"top_k": True}, "top_k must be an int"),
        ({"temperature": float("inf")}, "temperature must be > 0 and finite"),
        ({"teacher_lambda": float("nan")}, "teacher_lambda must be a finite number"),
        ({"l2_reg": -1e-4}, "l2_reg must be >= 0"),
        ({"kl_weight": float("nan")}, "kl_weight must be a finite number >= 0"),
        ({"completion_floor": 0.0}, r"completion_floor must be a probability in \(0, 1\).*got 0.0"),
        ({"completion_floor": 1.0}, r"completion_floor must be a probability in \(0, 1\).*got 1.0"),
        ({"completion_floor": -1e-6}, "completion_floor must be a probability in"),
        ({"completion_floor": float("nan")}, "completion_floor must be a probability in"),
        ({"completion_floor": True}, "completion_floor must be a probability in"),
        ({"completion_floor": "1e-6"}, "completion_floor must be a probability in"),
    ],
)
def test_params_are_validated_when_built(change, message):
    from bft.loss import BFTLossParams

    with pytest.raises(ValueError, match=message):
        BFTLossParams(**change)
    with pytest.raises(AttributeError):  # frozen: one object, unchanged on its way down
        BFTLossParams().completion = "mass"


def test_module_forward_takes_given_ids_and_risk():
    """BFTLoss.forward passes the teacher cache's ids and risk on to bft_loss."""
    tensors, harmful, valid = make_case(6, 8, 80, seed=9)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(80, generator=g)[:4] for _ in range(6)])
    risk = torch.rand(6, generator=g)
    module = bft.BFTLoss(top_k=4, completion="mass", backend="torch")
    out = module(*tensors, harmful=harmful, valid=valid, topk_ids=ids, risk=risk)
    want = bft.bft_loss(
        *tensors, harmful=harmful, valid=valid, top_k=4, completion="mass", backend="reference", topk_ids=ids, risk=risk
    )
    assert torch.equal(out.topk_ids[valid], ids[valid])
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-7)
    assert "completion=mass" in repr(module)
