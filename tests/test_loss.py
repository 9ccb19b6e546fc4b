"""Every backend of bft.bft_loss against the plain PyTorch reference (loss, per-row outputs, both gradients).

fp32: close to the fp32 reference. bf16: CCE's criterion, |fast − fp64 truth| ≤ |bf16 torch − fp64 truth| + tol.
The triton backend runs through Triton's interpreter on CPU (tests/conftest.py), natively on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEFAULTS,
    DEVICES,
    TRITON_DEVICE,
    assert_matches,
    assert_topk_equivalent,
    cce_violations,
    delta_logits,
    home,
    make_case,
    run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bft

FAST = ["torch", "triton"]


# ---------------------------------------------------------------------------------------------------------------
# fp32: every fast backend against the fp32 reference


CASES = {
    "basic": dict(N=37, H=24, V=1000),
    "odd_vocab": dict(N=3, H=16, V=4099),
    "one_row": dict(N=1, H=8, V=257),
    "reverse_kl": dict(N=9, H=16, V=300, kl="reverse"),
    "k1": dict(N=6, H=8, V=211, top_k=1),
    "k_equals_v": dict(N=4, H=8, V=67, top_k=67),
    "lambda_tau": dict(N=8, H=16, V=333, teacher_lambda=0.6, temperature=1.0),
    "lambda_big_tau_odd": dict(N=8, H=16, V=333, teacher_lambda=2.5, temperature=3.5, kl="reverse"),
    "all_harmful_gamma": dict(N=8, H=16, V=333, p_harmful=1.0, gamma=3.0, alpha_base=0.5, l2_reg=0.1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", list(CASES))
def test_fast_backends_match_reference_fp32(case, backend, device):
    spec = dict(CASES[case])
    N, H, V = spec.pop("N"), spec.pop("H"), spec.pop("V")
    p_harmful = spec.pop("p_harmful", 0.5)
    tensors, harmful, valid = make_case(N, H, V, seed=hash(case) % 1000, p_harmful=p_harmful, device=device)
    ref = run(tensors, harmful, valid, "reference", **spec)
    fast = run(tensors, harmful, valid, backend, **spec)
    assert_matches(fast, ref, V=V, delta=delta_logits([t.cpu() for t in tensors]), valid=valid)


@pytest.mark.parametrize("backend", FAST)
def test_shared_head_keeps_aligned_branch_constant(backend):
    """A LoRA student shares the aligned model's lm_head: passing the same tensor twice must give the gradient of
    the student path only, exactly as if the aligned head were a separate constant copy."""
    tensors, harmful, valid = make_case(11, 16, 300, seed=3)
    tensors[3] = tensors[1]  # aligned head = student head (values)
    shared = run(tensors, harmful, valid, backend, shared_head=True)
    separate = run(tensors, harmful, valid, "reference")
    assert_matches(shared, separate, V=300, delta=delta_logits(tensors), valid=valid)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_no_gradient_reaches_frozen_models(backend):
    tensors, harmful, valid = make_case(5, 8, 100, seed=4, device=home(backend))
    xs = [t.clone().requires_grad_(True) for t in tensors]
    out = bft.bft_loss(*xs, harmful=harmful, valid=valid, backend=backend, **DEFAULTS)
    out.loss.backward()
    assert xs[0].grad is not None and xs[1].grad is not None
    assert all(x.grad is None for x in xs[2:])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("trained", ["hidden_only", "weight_only", "nothing"])
def test_frozen_student_parts_skip_their_gradient(backend, trained):
    """A LoRA student's frozen (often shared) head needs no dW; evaluation under no_grad needs no gradient at all.
    These paths skip GEMMs, so check them: same loss and rows as the reference, the other gradient unchanged."""
    tensors, harmful, valid = make_case(6, 8, 80, seed=18, device=home(backend))
    if trained == "hidden_only":  # frozen head shared with the aligned model, as with LoRA
        tensors[3] = tensors[1]
    ref = run(tensors, harmful, valid, "reference")
    xs = [t.clone() for t in tensors]
    if trained == "hidden_only":
        xs[3] = xs[1]
        xs[0].requires_grad_(True)
    elif trained == "weight_only":
        xs[1].requires_grad_(True)
    with torch.set_grad_enabled(trained != "nothing"):
        out = bft.bft_loss(*xs, harmful=harmful, valid=valid, backend=backend, **DEFAULTS)
    for key in ("loss", "kl", "completion", "risk", "alpha"):
        got = getattr(out, key).double()
        assert torch.allclose(got, ref[key], rtol=2e-4, atol=2e-5), key
    assert torch.equal(out.topk_ids, ref["topk_ids"])
    if trained == "nothing":
        assert not out.loss.requires_grad
        return
    out.loss.backward()
    grad, want, frozen = (xs[0], "dh", xs[1]) if trained == "hidden_only" else (xs[1], "dw", xs[0])
    assert torch.allclose(grad.grad.double(), ref[want], rtol=2e-4, atol=2e-5)
    assert frozen.grad is None


@pytest.mark.parametrize("backend", FAST)
def test_ignored_rows_are_ignored_whatever_they_hold(backend):
    """The fused backends drop invalid rows (prompt tokens, padding) before any GEMM: NaN, inf or huge hidden
    states and any harmful flag there change nothing, and those rows get exactly zero gradient."""
    tensors, harmful, valid = make_case(9, 8, 64, seed=16, p_valid=0.5)
    assert valid.any() and (~valid).sum() >= 2
    clean = run(tensors, harmful, valid, backend)
    dirty = [t.clone() for t in tensors]
    for i, garbage in ((0, float("nan")), (2, float("inf")), (4, 1e30)):
        dirty[i][~valid] = garbage
    out = run(dirty, harmful ^ ~valid, valid, backend)
    for key in ("loss", "kl", "completion", "risk", "alpha", "topk_ids", "dw"):
        assert torch.equal(out[key], clean[key]), key
    assert torch.equal(out["dh"][valid], clean["dh"][valid])
    assert (out["dh"][~valid] == 0).all() and (clean["dh"][~valid] == 0).all()


def test_torch_backend_vocab_slices_are_invisible(monkeypatch):
    """16-bit heads are upcast a vocabulary slice at a time; force many slices (the last one short) and compare."""
    from bft.kernels import chunking

    from bft import chunked
    from bft.loss import BFTLossParams

    tensors, harmful, _ = make_case(7, 8, 101, seed=17)
    xs = [t.bfloat16() for t in tensors]
    kw = dict(params=BFTLossParams(**DEFAULTS), scale=1 / 7, need_dh=True, need_dw=True)
    whole = chunked.bft_forward_backward_torch(*xs, harmful, **kw)
    monkeypatch.setattr(chunking, "VOCAB_SLICE_BYTES", 4 * 8 * 10)  # 10 vocabulary rows per slice
    assert len(list(chunking.vocab_slices(101, 8))) == 11
    sliced = chunked.bft_forward_backward_torch(*xs, harmful, **kw)
    assert torch.equal(sliced["topk_ids"], whole["topk_ids"])
    for key in ("loss_sum", "kl", "completion", "risk", "alpha", "grad_hidden", "grad_weight"):
        assert torch.allclose(sliced[key], whole[key], rtol=1e-5, atol=1e-7), key


def test_torch_backend_topk_equals_the_stable_sort():
    """The torch backend's O(V) top-k (torch.topk + lowest ids among the tied k-th value) against the reference's
    stable sort: heavy ties, ±0, ±inf, k = 1 and k = V, and NaN rows (which fall back to the sort)."""
    from bft.chunked import topk_ids_lowest_id_ties
    from bft.reference import topk_lowest_id_ties

    g = torch.Generator().manual_seed(19)
    x = torch.randint(-3, 4, (64, 37), generator=g).float()  # few distinct values: ties at every k
    x[0, :5] = -0.0
    x[1] = float("inf")
    x[2, ::3] = float("-inf")
    x[3] = torch.randn(37, generator=g)
    for k in (1, 2, 7, 20, 36, 37):
        assert torch.equal(topk_ids_lowest_id_ties(x, k), topk_lowest_id_ties(x, k)), k
    x[4, 6] = float("nan")
    assert torch.equal(topk_ids_lowest_id_ties(x, 5), topk_lowest_id_ties(x, 5))


@pytest.mark.parametrize("backend", FAST)
def test_grad_output_scales_gradients_and_chunking_is_invisible(backend):
    tensors, harmful, valid = make_case(21, 16, 250, seed=5)
    ref = run(tensors, harmful, valid, "reference", grad_scale=2.5)
    fast = run(tensors, harmful, valid, backend, grad_scale=2.5, chunk_rows=4)
    assert_matches(fast, ref, V=250, delta=delta_logits(tensors), valid=valid)


@pytest.mark.parametrize("group_chunks", [1, 2, 3])
@pytest.mark.parametrize("p_valid", [1.0, 0.8])
def test_triton_gradient_groups_are_invisible(group_chunks, p_valid, monkeypatch):
    """With dW, the triton driver keeps G for a group of chunks and runs dH/dW once per group: any grouping, with a
    partial last group and a partial last chunk (23 rows, chunks of 4), gives the reference's gradients."""
    import bft.kernels.bft_loss as driver

    tensors, harmful, valid = make_case(23, 16, 250, seed=7, p_valid=p_valid, device=home("triton"))
    monkeypatch.setattr(driver, "DEFAULT_GROUP_BYTES", group_chunks * 4 * 250 * 4)  # fp32 G, chunks of 4 rows
    ref = run(tensors, harmful, valid, "reference", grad_scale=1.5)
    fast = run(tensors, harmful, valid, "triton", grad_scale=1.5, chunk_rows=4)
    assert_matches(fast, ref, V=250, delta=delta_logits(tensors), valid=valid)


def test_triton_group_rows_are_whole_chunks():
    from bft.kernels.bft_loss import default_group_rows

    assert default_group_rows(8192, 128256, 256, 2, need_dw=True) == 2048  # 512 MiB of bf16 G
    assert default_group_rows(8192, 128256, 384, 2, need_dw=False) == 384  # no dW: one chunk
    assert default_group_rows(100, 1000, 8, 4, need_dw=True, group_bytes=10**9) == 104  # capped at the rows, whole
    assert default_group_rows(100, 1000, 8, 4, need_dw=True, group_bytes=1) == 8  # at least one chunk


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_all_rows_invalid_gives_zero_loss_and_zero_gradients(backend):
    tensors, harmful, _ = make_case(6, 8, 90, seed=6)
    valid = torch.zeros(6, dtype=torch.bool)
    out = run(tensors, harmful, valid, backend)
    assert out["loss"].item() == 0.0
    for key in ("dh", "dw", "kl", "completion", "risk", "alpha"):
        assert torch.isfinite(out[key]).all() and (out[key] == 0).all(), key
    assert (out["topk_ids"] == -1).all()


@pytest.mark.parametrize("backend", FAST)
def test_exact_ties_go_to_the_lower_id(backend):
    """Small-integer hidden states and weights make exact logits, hence many exactly tied Δ values."""
    tensors, harmful, valid = make_case(9, 4, 150, seed=7, integer=True)
    delta = delta_logits(tensors)
    ref = run(tensors, harmful, valid, "reference", top_k=20)
    fast = run(tensors, harmful, valid, backend, top_k=20)
    assert torch.equal(fast["topk_ids"].cpu(), ref["topk_ids"].cpu())
    assert torch.equal(fast["risk"], ref["risk"])
    for n in valid.nonzero().flatten().tolist():  # the rule itself, written independently: sort by (−Δ, id)
        order = sorted(range(150), key=lambda v: (-delta[n, v].item(), v))[:20]
        assert ref["topk_ids"][n].tolist() == order
    assert any(len(set(delta[n, ref["topk_ids"][n]].tolist())) < 20 for n in range(9)), "the case has no ties"


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_large_logits_do_not_overflow(backend, kl):
    tensors, harmful, valid = make_case(7, 16, 500, seed=8, scale=1000.0)
    truth = run(tensors, harmful, valid, "ref64", temperature=2.0, kl=kl)
    out = run(tensors, harmful, valid, backend, kl=kl)
    for key in ("loss", "kl", "completion", "dh", "dw"):
        assert torch.isfinite(out[key]).all(), key
        scale = truth[key].abs().max().item()
        assert (out[key] - truth[key]).abs().max().item() <= 1e-4 * scale + 1e-6, key


# ---------------------------------------------------------------------------------------------------------------
# 16-bit inputs: CCE's criterion against fp64 truth


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_16bit_inputs_are_no_worse_than_same_dtype_torch(dtype, backend, kl, device):
    tensors, harmful, valid = make_case(29, 32, 1000, seed=9, device=device)
    tensors = [t.to(dtype) for t in tensors]  # the inputs are 16-bit; truth is computed from these exact values
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, kl=kl)
    naive = run(tensors, harmful, valid, "ref_same", dtype=dtype, kl=kl)
    fast = run(tensors, harmful, valid, backend, dtype=dtype, kl=kl)
    assert not cce_violations(fast, naive, truth)


def test_triton_16bit_gradient_block_matches_cuda_behaviour():
    """On CUDA the gradient block is stored in the input dtype for tensor-core GEMMs; run that path on CPU too."""
    from bft.kernels import bft_loss as kernel_driver

    from bft.loss import BFTLossParams

    tensors, harmful, _ = make_case(13, 16, 300, seed=10)
    xs = [t.bfloat16() for t in tensors]
    truth = run(
        tensors=[t.float() for t in xs],
        harmful=harmful,
        valid=torch.ones(13, dtype=torch.bool),
        backend="ref64",
        dtype=torch.float64,
    )
    naive = run([t.float() for t in xs], harmful, torch.ones(13, dtype=torch.bool), "ref_same", dtype=torch.bfloat16)
    res = kernel_driver.bft_forward_backward_triton(
        *(x.to(TRITON_DEVICE) for x in xs),
        harmful.to(TRITON_DEVICE),
        params=BFTLossParams(**DEFAULTS),
        scale=1 / 13,
        need_dh=True,
        need_dw=True,
        grad_dtype=torch.bfloat16,
    )
    for key, mine in (("dh", res["grad_hidden"].cpu()), ("dw", res["grad_weight"].cpu())):
        scale = truth[key].abs().max().item()
        err = (mine.double() - truth[key]).abs().max().item()
        assert err <= (naive[key] - truth[key]).abs().max().item() + 1e-3 * scale, key


# ---------------------------------------------------------------------------------------------------------------
# the comparisons above are able to fail


def test_a_deliberately_wrong_formula_is_caught():
    tensors, harmful, valid = make_case(10, 16, 200, seed=11)
    ref = run(tensors, harmful, valid, "reference")
    delta = delta_logits(tensors)
    wrong_teacher = run(tensors, harmful, valid, "torch", teacher_lambda=1.0)  # plain aligned teacher, not hybrid
    with pytest.raises(AssertionError):
        assert_matches(wrong_teacher, ref, V=200, delta=delta, valid=valid)
    wrong_kl = run(tensors, harmful, valid, "torch", kl="reverse")
    with pytest.raises(AssertionError):
        assert_matches(wrong_kl, ref, V=200, delta=delta, valid=valid)
    right = run(tensors, harmful, valid, "torch")
    off_by_a_percent = {**right, "dw": right["dw"] * 1.01}
    with pytest.raises(AssertionError):
        assert_matches(off_by_a_percent, ref, V=200, delta=delta, valid=valid)
    wrong_ids = {**right, "topk_ids": torch.where(right["topk_ids"] >= 0, (right["topk_ids"] + 1) % 200, -1)}
    with pytest.raises(AssertionError):
        assert_matches(wrong_ids, ref, V=200, delta=delta, valid=valid)


def test_the_16bit_criterion_is_able_to_fail():
    """CCE's criterion allows the same-dtype error; a slightly wrong formula in bf16 must still exceed it."""
    tensors, harmful, valid = make_case(29, 32, 1000, seed=9)
    tensors = [t.bfloat16() for t in tensors]
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64)
    naive = run(tensors, harmful, valid, "ref_same", dtype=torch.bfloat16)
    assert not cce_violations(run(tensors, harmful, valid, "torch", dtype=torch.bfloat16), naive, truth)
    wrong = run(tensors, harmful, valid, "torch", dtype=torch.bfloat16, teacher_lambda=1.15)
    assert {v.split(":")[0] for v in cce_violations(wrong, naive, truth)} >= {"loss", "kl", "dh", "dw"}


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_reference_matches_hand_written_equations(kl):
    """The reference itself against the paper's equations written out per row in fp64 loops."""
    tensors, harmful, valid = make_case(4, 8, 50, seed=12)
    assert not valid.all() and valid.any() and not harmful[valid].all() and harmful[valid].any()
    tau, lam, k, l2, ab, gm = 2.0, 1.2, 7, 0.01, 1.0, 1.0
    out = run(tensors, harmful, valid, "ref64", dtype=torch.float64, kl=kl)
    sh, sw, ah, aw, bh, bw = (t.double() for t in tensors)
    s, a, b = sh @ sw.T, ah @ aw.T, bh @ bw.T
    total, n_valid = 0.0, int(valid.sum())
    for n in range(4):
        t = lam * a[n] + (1 - lam) * b[n]
        pt, ps = torch.softmax(t / tau, 0), torch.softmax(s[n] / tau, 0)
        p, q = (pt, ps) if kl == "forward" else (ps, pt)  # forward: KL(teacher ‖ student); reverse: Eq. 14
        kl_n = tau**2 * float((p * (p.log() - q.log())).sum())
        delta = b[n] - a[n]
        top = sorted(range(50), key=lambda v: (-delta[v].item(), v))[:k]
        completion = l2 * sum(float(s[n, v]) ** 2 for v in top)
        risk = sum(1 for v in range(50) if torch.log_softmax(b[n], 0)[v] > torch.log_softmax(a[n], 0)[v]) / 50
        alpha = ab * (1 + gm * risk)
        if valid[n]:
            assert out["kl"][n].item() == pytest.approx(kl_n, rel=1e-9)
            assert out["alpha"][n].item() == pytest.approx(alpha, rel=1e-12)
            assert out["completion"][n].item() == pytest.approx(completion, rel=1e-9)
            assert out["risk"][n].item() == pytest.approx(risk)
            assert out["topk_ids"][n].tolist() == top
            total += kl_n + float(harmful[n]) * alpha * completion
    assert out["loss"].item() == pytest.approx(total / n_valid, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# fuzzing small shapes


@st.composite
def small_problems(draw):
    N = draw(st.integers(1, 6))
    V = draw(st.integers(2, 48))
    return dict(
        N=N,
        H=draw(st.integers(1, 8)),
        V=V,
        seed=draw(st.integers(0, 10_000)),
        top_k=draw(st.integers(1, V)),
        kl=draw(st.sampled_from(["forward", "reverse"])),
        teacher_lambda=draw(st.floats(-1.0, 3.0)),
        temperature=draw(st.floats(0.5, 4.0)),
        scale=draw(st.sampled_from([0.1, 3.0, 30.0])),
    )


def _fuzz(problem, backend):
    """The fast backend against fp64 truth, within a few times the fp32 reference's own error (CCE's criterion)
    plus a small tolerance. Comparing with the fp32 reference alone failed where fp32 rounding itself is large
    (N=3, H=6, V=35, seed 4488, top_k=1, reverse KL, λ=0, scale 30: dh of the reference is 1.2e-4 from fp64, the
    torch backend 2.8e-4, on a dh of 0.011 — near one-hot softmaxes of logits ~±100)."""
    p = dict(problem)
    tensors, harmful, valid = make_case(p.pop("N"), p.pop("H"), p.pop("V"), seed=p.pop("seed"), scale=p.pop("scale"))
    ref = run(tensors, harmful, valid, "reference", **p)
    truth = run(tensors, harmful, valid, "ref64", dtype=torch.float64, **p)
    fast = run(tensors, harmful, valid, backend, **p)
    for key in ("loss", "kl", "completion", "alpha", "dh", "dw"):
        scale = truth[key].abs().max().item() if truth[key].numel() else 0.0
        err = (fast[key].cpu() - truth[key].cpu()).abs().max().item() if truth[key].numel() else 0.0
        ref_err = (ref[key].cpu() - truth[key].cpu()).abs().max().item() if truth[key].numel() else 0.0
        # two fp32 computations with different summation orders (chunks, kernels): each lands within a few times
        # the other's rounding error of the truth
        assert err <= 4 * ref_err + 2e-5 + 2e-4 * scale, f"{key}: error {err:.3g}, fp32 reference {ref_err:.3g}"
    V = tensors[1].shape[0]
    assert (fast["risk"].cpu() - ref["risk"].cpu()).abs().max().item() <= 2.0 / V + 1e-7
    assert_topk_equivalent(fast["topk_ids"].cpu(), ref["topk_ids"].cpu(), delta_logits(tensors), valid.cpu())


def test_fuzz_regression_case_where_fp32_reference_rounds_most():
    problem = {
        "N": 3,
        "H": 6,
        "V": 35,
        "seed": 4488,
        "top_k": 1,
        "kl": "reverse",
        "teacher_lambda": 0.0,
        "temperature": 2.0,
        "scale": 30.0,
    }
    for backend in FAST:
        _fuzz(problem, backend)


# derandomized: the same examples in every run, so CI never depends on which cases a random draw finds
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_fuzz_torch_backend(problem):
    _fuzz(problem, "torch")


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_fuzz_triton_backend(problem):
    _fuzz(problem, "triton")


# ---------------------------------------------------------------------------------------------------------------
# API surface


def test_module_wrapper_and_auto_backend():
    tensors, harmful, valid = make_case(8, 8, 120, seed=13)
    module = bft.BFTLoss(**DEFAULTS)
    a = module(*tensors, harmful=harmful, valid=valid)
    b = bft.bft_loss(*tensors, harmful=harmful, valid=valid, backend="reference", **DEFAULTS)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    assert "top_k=7" in repr(module)
    with pytest.raises(ValueError, match="backend must be one of"):
        bft.BFTLoss(backend="gpu")
    assert bft.loss.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_defaults_need_no_masks():
    tensors, _, _ = make_case(5, 8, 150, seed=14)
    out = bft.bft_loss(*tensors, backend="torch")
    assert out.topk_ids.shape == (5, 100)
    assert (out.topk_ids >= 0).all()
    ref = bft.bft_loss(*tensors, backend="reference")
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)  # nothing harmful: the loss is the mean KL
    assert out.loss.item() == pytest.approx(out.kl.mean().item(), rel=1e-5)


def _bad(**change):
    tensors, harmful, valid = make_case(4, 8, 30, seed=15)
    names = ["student_hidden", "student_weight", "aligned_hidden", "aligned_weight", "base_hidden", "base_weight"]
    args = dict(zip(names, tensors))
    kwargs = {"harmful": harmful, "valid": valid, "top_k": 5}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    return args, kwargs


BAD_INPUTS = {
    "1-D hidden": (dict(student_hidden=torch.randn(8)), "2-D"),
    "vocab mismatch": (dict(base_weight=torch.randn(31, 8)), "vocab mismatch"),
    "row mismatch": (dict(aligned_hidden=torch.randn(5, 8)), "same N"),
    "hidden size mismatch": (dict(student_hidden=torch.randn(4, 9)), "hidden size mismatch"),
    "dtype mismatch": (dict(base_hidden=torch.randn(4, 8, dtype=torch.float64)), "dtype mismatch"),
    "integer tensor": (dict(base_hidden=torch.ones(4, 8, dtype=torch.int64)), "floating"),
    "top_k zero": (dict(top_k=0), "top_k must be >= 1, got 0"),
    "top_k above V": (dict(top_k=31), r"top_k=31 must be in \[1, V=30\]"),
    "top_k not int": (dict(top_k=2.5), "top_k must be an int"),
    "bad kl": (dict(kl="sideways"), "kl must be one of"),
    "bad backend": (dict(backend="cuda"), "backend must be one of"),
    "harmful length": (dict(harmful=torch.zeros(5, dtype=torch.bool)), r"harmful must have shape \[N=4\]"),
    "valid length": (dict(valid=torch.zeros(3, dtype=torch.bool)), r"valid must have shape \[N=4\]"),
    "harmful not bool": (dict(harmful=torch.zeros(4)), "harmful must be a bool tensor"),
    "temperature": (dict(temperature=0.0), "temperature must be > 0"),
    "negative l2": (dict(l2_reg=-1.0), "l2_reg must be >= 0"),
    "chunk rows": (dict(chunk_rows=0), "chunk_rows must be a positive int"),
    "not a tensor": (dict(aligned_weight=[[0.0] * 8] * 30), "aligned_weight must be a torch.Tensor"),
    "1-D weight": (dict(student_weight=torch.randn(30)), r"student_weight must be 2-D \[V, H\]"),
    "device mismatch": (dict(base_hidden=torch.empty(4, 8, device="meta")), "device mismatch"),
    "negative alpha_base": (dict(alpha_base=-0.5), "alpha_base must be >= 0"),
    "negative gamma": (dict(gamma=-1.0), "gamma must be >= 0"),
    "nan temperature": (dict(temperature=float("nan")), "temperature must be > 0"),
    "valid not bool": (dict(valid=torch.ones(4, dtype=torch.int64)), "valid must be a bool tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(name):
    change, message = BAD_INPUTS[name]
    args, kwargs = _bad(**change)
    with pytest.raises(ValueError, match=message):
        bft.bft_loss(**args, **kwargs)


def test_base_favored_tokens_use_probabilities_for_the_count():
    aligned = torch.randn(3, 40)
    out = bft.base_favored_tokens(base_logits=aligned.clone(), aligned_logits=aligned, top_k=4)
    assert (out.count == 0).all()  # π_base = π_aligned: nothing is base-favored
    assert torch.equal(out.ids, torch.arange(4).expand(3, 4))  # Δ ties everywhere: lowest ids first
    shifted = aligned.double() + 5.0  # same distribution up to rounding, though every logit is larger
    out = bft.base_favored_tokens(base_logits=shifted, aligned_logits=aligned.double(), top_k=4)
    assert (out.delta == 5.0).all()  # every logit is larger, yet the count (probabilities) is not "all"
    assert (out.count < 40).all()
    base = aligned.clone()
    base[:, 7] += 3.0  # one token gains probability, all others lose a little
    out = bft.base_favored_tokens(base_logits=base, aligned_logits=aligned, top_k=1)
    assert (out.count == 1).all() and (out.ids[:, 0] == 7).all()
    with pytest.raises(ValueError, match="top_k=41"):
        bft.base_favored_tokens(base_logits=base, aligned_logits=aligned, top_k=41)
    with pytest.raises(ValueError, match="differ in shape"):
        bft.base_favored_tokens(base_logits=base[:, :39], aligned_logits=aligned, top_k=1)


def test_hybrid_teacher_extrapolates_in_fp32():
    a = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    b = torch.tensor([[3.0, -1.0]], dtype=torch.bfloat16)
    t = bft.hybrid_teacher_logits(a, b, teacher_lambda=1.2)
    assert t.dtype == torch.float32
    assert torch.allclose(t, torch.tensor([[1.2 - 0.6, 2.4 + 0.2]]))
