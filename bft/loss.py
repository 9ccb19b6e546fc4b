"""The BFT objective (paper Eq. 8-14): one public function that validates its input and dispatches on ``backend=``.

Backends:

- ``"reference"``: :func:`bft.reference.bft_loss_reference`, full [N, V] logits, autograd. The oracle.
- ``"torch"``: the same math over row chunks of bounded size (:mod:`bft.chunked`); runs anywhere.
- ``"triton"``: fused kernels (:mod:`bft.kernels`); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``"auto"``: triton on CUDA, torch otherwise.

The torch and triton backends compute the student's gradients during the forward pass (the frozen GEMMs run
once) and only scale them by the incoming gradient in backward. Both first drop the invalid rows, so ignored
positions (prompt tokens, padding) cost nothing.

Default strengths (the paper gives none): ``alpha_base = 1``, ``gamma = 1``, ``l2_reg = 1e-4``, meant to put the
two terms on one order where training starts (student = aligned model, s = a):

- KL: for small Δ, τ²·KL ≈ (λ − 1)²/2 · Var_{softmax(t/τ)}(Δ) = 0.02·Var(Δ) at λ = 1.2 (τ cancels), so a pair
  whose Δ spreads by ~1.5-5 nats over the likely tokens starts at ~0.05-0.5 per token. That range is an estimate:
  it needs a real base/aligned pair and has not been measured here.
- completion: Σ_{v∈TopK(Δ,100)} s_v² depends on where TopK(Δ) falls. Measured on SmolLM2-135M-Instruct (133
  AdvBench response positions, ``benchmarks/results/loss_scales_smollm2.json``): at 100 random ids |s| ≈ 4.8 and
  Σ s_v² ≈ 3.8·10³ (median 2.1·10³), so ``1e-4·Σ s_v²`` ≈ 0.4; at the aligned model's own top-100 ids |s| ≈ 15 and
  Σ s_v² ≈ 2.6·10⁴, i.e. ≈ 2.6. So the penalty matches the KL's order when the base-favored ids look like random
  ids and outweighs it up to ~10× when they are plausible tokens.
- risk: ``gamma = 1`` raises α by the base-favored fraction of the vocabulary (guessed ~0.3-0.6; needs a real pair).

``benchmarks/loss_scales.py --aligned ... --base ...`` measures all of these on your own pair (the KL, risk and
the penalty / KL ratio at these defaults); scale ``l2_reg`` so that the ratio is of order 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bft.kernels.params import (  # noqa: F401  (the settings' one home; re-exported as part of this module's API)
    COMPLETION_TERMS,
    DEFAULT_ALPHA_BASE,
    DEFAULT_GAMMA,
    DEFAULT_KL_WEIGHT,
    DEFAULT_L2_REG,
    DEFAULT_SELECTION_TOP_P,
    DEFAULT_TEACHER_LAMBDA,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    KL_DIRECTIONS,
    SELECTION_RULES,
    BFTLossParams,
)
from bft.reference import bft_loss_reference

BACKENDS = ("auto", "reference", "torch", "triton")

#: the objective's setting names (the fields of :class:`BFTLossParams`, their one declaration)
PARAM_NAMES = tuple(BFTLossParams().as_kwargs())


def resolve_params(params: BFTLossParams | None, settings: dict) -> BFTLossParams:
    """``params``, or a :class:`BFTLossParams` built (and validated) from ``settings``, the objective's settings
    passed by name (``top_k=7, completion="mass"``; the rest take its defaults). Passing both is an error, so a call
    can never silently drop a setting; an unknown name is an error naming the valid ones."""
    unknown = sorted(set(settings) - set(PARAM_NAMES))
    if unknown:
        raise ValueError(f"unknown loss setting(s) {', '.join(unknown)}; the settings are {', '.join(PARAM_NAMES)}")
    if params is None:
        return BFTLossParams(**settings)
    if not isinstance(params, BFTLossParams):
        raise ValueError(f"params must be a bft.loss.BFTLossParams, got {type(params).__name__}")
    if settings:
        raise ValueError(
            "pass the loss settings either as params= or as keywords, not both "
            f"(got params and {', '.join(sorted(settings))})"
        )
    return params


@dataclass
class BFTLossOutput:
    """What :func:`bft_loss` returns.

    loss:       scalar, differentiable w.r.t. student_hidden and student_weight.
    kl:         [N] τ²-scaled KL per row, unweighted by kl_weight (0 on invalid rows), detached.
    completion: [N] the completion term per row (l2_reg·Σ_{v∈M_n} s_v² for "l2"), whether or not the row is
                harmful (0 on invalid rows).
    risk:       [N] base-favored density |B_n|/V (0 on invalid rows).
    alpha:      [N] α_n = alpha_base·(1 + γ·risk_n) (0 on invalid rows).
    topk_ids:   [N, top_k] int64 top-k ids of base − aligned logits, ties to the lower id (−1 on invalid rows).
    """

    loss: torch.Tensor
    kl: torch.Tensor
    completion: torch.Tensor
    risk: torch.Tensor
    alpha: torch.Tensor
    topk_ids: torch.Tensor


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _validate(tensors: dict[str, torch.Tensor], harmful, valid, params: BFTLossParams, backend: str):
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            kind = "[N, H] hidden states" if name.endswith("hidden") else "[V, H] lm_head weight"
            raise ValueError(f"{name} must be 2-D {kind}, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp32/bf16/fp16/fp64), got {x.dtype}")
    dtypes = {name: x.dtype for name, x in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"dtype mismatch between the six tensors: {dtypes}")
    devices = {name: str(x.device) for name, x in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"device mismatch between the six tensors: {devices}")
    N = tensors["student_hidden"].shape[0]
    V = tensors["student_weight"].shape[0]
    for model in ("student", "aligned", "base"):
        h, w = tensors[f"{model}_hidden"], tensors[f"{model}_weight"]
        if h.shape[0] != N:
            raise ValueError(
                f"{model}_hidden has {h.shape[0]} rows but student_hidden has {N}: all three models must see the "
                "same N token positions"
            )
        if w.shape[0] != V:
            raise ValueError(
                f"vocab mismatch: {model}_weight has V={w.shape[0]} rows but student_weight has V={V}; "
                "base, aligned and student must share one vocabulary"
            )
        if h.shape[1] != w.shape[1]:
            raise ValueError(
                f"hidden size mismatch: {model}_hidden is [N, {h.shape[1]}] but {model}_weight is [V, {w.shape[1]}]"
            )
    if V < 1:
        raise ValueError("the vocabulary is empty (V = 0)")
    for name, mask in (("harmful", harmful), ("valid", valid)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name} must be a bool tensor of shape [N={N}], got {got}")
        if tuple(mask.shape) != (N,):
            raise ValueError(f"{name} must have shape [N={N}], got {tuple(mask.shape)}")
    params.check_vocab(V)  # the rest of params was validated when it was built
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _validate_given(topk_ids, risk, valid: torch.Tensor, N: int, V: int, top_k: int, device: torch.device):
    """Checks of the given base-favored ids and density (a teacher cache's); only valid rows are read."""
    if (topk_ids is None) != (risk is None):
        raise ValueError(
            "pass both topk_ids and risk (the base-favored ids and density of a teacher cache), or neither"
        )
    if topk_ids is None:
        return
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
        got = topk_ids.dtype if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
        raise ValueError(f"topk_ids must be an int32/int64 tensor of shape [N={N}, top_k={top_k}], got {got}")
    if tuple(topk_ids.shape) != (N, top_k):
        raise ValueError(f"topk_ids must have shape [N={N}, top_k={top_k}], got {tuple(topk_ids.shape)}")
    if not isinstance(risk, torch.Tensor) or not risk.is_floating_point() or tuple(risk.shape) != (N,):
        got = f"{risk.dtype} {tuple(risk.shape)}" if isinstance(risk, torch.Tensor) else type(risk).__name__
        raise ValueError(f"risk must be a float tensor of shape [N={N}], got {got}")
    for name, x in (("topk_ids", topk_ids), ("risk", risk)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the hidden states are on {device}")
    ids, r = topk_ids[valid], risk[valid]
    if ids.numel():
        if bool(((ids < 0) | (ids >= V)).any()):
            raise ValueError(f"topk_ids holds ids outside [0, V={V}) on valid rows")
        if top_k > 1 and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("topk_ids repeats an id within a valid row: the k base-favored ids must be distinct")
    if r.numel() and not bool(((r >= 0) & (r <= 1)).all()):
        raise ValueError("risk must lie in [0, 1] on valid rows (it is a fraction of the vocabulary)")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


class _FusedBFTLoss(torch.autograd.Function):
    """Loss whose gradients were computed in the forward pass; backward only scales them.

    The gradients are fp32 (dW is the largest: V·H·4 bytes) and backward takes them over: an fp32 gradient is
    returned as it is (d loss = 1) or scaled in place; a 16-bit one is scaled and rounded a row slice at a time
    straight into the output dtype (one rounding, as autograd would). No second full-size fp32 copy is made, and
    the graph no longer holds them afterwards. The price: backward runs once per forward (as Liger's fused losses);
    a second backward through a retained graph raises instead of returning wrong gradients.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, run):
        loss, rows, grad_hidden, grad_weight = run()
        ctx.grads = [grad_hidden, grad_weight]  # handed over in backward, so not save_for_backward
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.mark_non_differentiable(*rows)
        return (loss, *rows)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "bft_loss computes its gradients in the forward pass and hands them to the first "
                "backward; a second backward through the same graph (retain_graph=True) is not "
                "supported. Call bft_loss again, or sum the losses before one backward."
            )
        factor = grad_loss.detach().float()
        out = [_scaled_gradient(g, factor, dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return out[0], out[1], None


# rows of a saved gradient converted per slice in backward (bounds the fp32 temporary to ~64 MiB)
_BACKWARD_SLICE_BYTES = 64 * 2**20


def _scaled_gradient(grad: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(grad·factor).to(dtype)`` for an fp32 ``grad`` this function may overwrite, rounded once, without a
    full-size temporary."""
    if dtype == grad.dtype:
        return grad if bool(factor == 1) else grad.mul_(factor)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    rows = max(1, _BACKWARD_SLICE_BYTES // max(1, grad[0].numel() * grad.element_size()))
    for r0 in range(0, grad.shape[0], rows):
        out[r0 : r0 + rows] = grad[r0 : r0 + rows] * factor
    return out


def _selected_rows(tensors, valid, params: BFTLossParams):
    """M and risk of the valid rows under ``params.selection`` (:func:`bft.chunked.base_favored_rows`, the
    reference's selection a row chunk at a time), given to the Triton backend as ``topk_ids`` / ``risk``: its row
    kernel keeps a running top-k over the whole vocabulary, which a rule that needs the base's sorted distribution
    cannot stream. Costs the two frozen logit GEMMs once more."""
    from bft.chunked import base_favored_rows

    N, dev = valid.shape[0], valid.device
    idx = valid.nonzero().squeeze(1)
    ids = torch.zeros(N, params.top_k, dtype=torch.int64, device=dev)
    risk = torch.zeros(N, dtype=torch.float32, device=dev)
    with torch.no_grad():
        ids[idx], risk[idx] = base_favored_rows(
            tensors["aligned_hidden"].detach().index_select(0, idx),
            tensors["aligned_weight"].detach(),
            tensors["base_hidden"].detach().index_select(0, idx),
            tensors["base_weight"].detach(),
            top_k=params.top_k,
            selection=params.selection,
            selection_top_p=params.selection_top_p,
        )
    return ids, risk


def _run_fused(impl, tensors, harmful, valid, params: BFTLossParams, topk_ids=None, risk=None, **impl_kwargs):
    """Compact the valid rows, run a grads-in-forward implementation, scatter the results back to N rows."""
    sh = tensors["student_hidden"]
    sw = tensors["student_weight"]
    N = sh.shape[0]
    need_dh = sh.requires_grad and torch.is_grad_enabled()
    need_dw = sw.requires_grad and torch.is_grad_enabled()
    idx = valid.nonzero().squeeze(1)
    n_valid = idx.numel()

    def run():
        with torch.no_grad():
            if n_valid == N:  # nothing to compact: no copies of the hidden states
                pick = lambda x: x.detach()  # noqa: E731
            else:
                pick = lambda x: x.detach().index_select(0, idx)  # noqa: E731
            if topk_ids is not None:
                impl_kwargs["topk_ids"] = pick(topk_ids)
                impl_kwargs["risk"] = pick(risk).float()
            res = impl(
                pick(sh),
                sw.detach(),
                pick(tensors["aligned_hidden"]),
                tensors["aligned_weight"].detach(),
                pick(tensors["base_hidden"]),
                tensors["base_weight"].detach(),
                harmful.index_select(0, idx),
                params=params,
                scale=1.0 / max(1, n_valid),
                need_dh=need_dh,
                need_dw=need_dw,
                **impl_kwargs,
            )
            dev = sh.device
            rows = []
            for name in ("kl", "completion", "risk", "alpha"):
                full = torch.zeros(N, dtype=torch.float32, device=dev)
                full[idx] = res[name].float()
                rows.append(full)
            ids = torch.full((N, params.top_k), -1, dtype=torch.int64, device=dev)
            ids[idx] = res["topk_ids"].long()
            dh = None
            if need_dh and n_valid == N:  # every row valid: the compacted gradient is already in row order
                dh = res["grad_hidden"].float()
            elif need_dh:
                dh = torch.zeros(sh.shape, dtype=torch.float32, device=dev)
                dh[idx] = res["grad_hidden"].float()
            dw = res["grad_weight"] if need_dw else None
            if dw is not None:
                dw = dw.float()
            elif need_dw:
                dw = torch.zeros(sw.shape, dtype=torch.float32, device=dev)
            loss = res["loss_sum"].float().reshape(()) / max(1, n_valid)
            return loss, tuple(rows) + (ids,), dh, dw

    loss, kl, completion, risk, alpha, topk_ids = _FusedBFTLoss.apply(sh, sw, run)
    return BFTLossOutput(loss=loss, kl=kl, completion=completion, risk=risk, alpha=alpha, topk_ids=topk_ids)


def bft_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    aligned_hidden: torch.Tensor,
    aligned_weight: torch.Tensor,
    base_hidden: torch.Tensor,
    base_weight: torch.Tensor,
    *,
    harmful: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    params: BFTLossParams | None = None,
    backend: str = "auto",
    chunk_rows: int | None = None,
    topk_ids: torch.Tensor | None = None,
    risk: torch.Tensor | None = None,
    **settings,
) -> BFTLossOutput:
    """The BFT objective from hidden states and lm_head weights, never holding [N, V] logits (but "reference").

    Per row n with s = h_s W_sᵀ, a = h_a W_aᵀ, b = h_b W_bᵀ accumulated in fp32, Δ = b − a and the hybrid
    teacher t = λ·a + (1 − λ)·b::

        KL_n         = τ²·KL(softmax(t/τ) ‖ softmax(s/τ))         (kl="forward"; "reverse" swaps the arguments)
        completion_n = l2_reg·Σ_{v ∈ M} s_v²                        (completion="l2", Eq. 9; M = TopK(Δ, k))
                     = Σ_{v ∈ M} π_s(v)                            ("mass", π_s = softmax(s))
                     = −log(1 − Σ_{v ∈ M} π_s(v))                  ("unlikelihood")
                     = max(0, log Σ_{v ∈ M} π_s(v) − log p_floor)  ("log_mass", p_floor = completion_floor)
        risk_n       = |{v : log_softmax(b)_v > log_softmax(a)_v}| / V
        α_n          = alpha_base·(1 + γ·risk_n)                   (no gradient)
        loss         = Σ_{n valid} (kl_weight·KL_n + harmful_n·α_n·completion_n) / max(1, #valid)

    Args:
        student_hidden, aligned_hidden, base_hidden: [N, H*] final hidden states (H may differ per model).
        student_weight, aligned_weight, base_weight: [V, H*] lm_head weights. ``student_weight`` may be the very
            same tensor as ``aligned_weight`` (a LoRA student sharing its head); the aligned branch stays constant.
        harmful: [N] bool, rows that get the completion penalty (default: none).
        valid: [N] bool, rows that count at all (default: all).
        params: the objective's settings as one :class:`BFTLossParams` (what the trainer passes): k, τ, λ, alpha_base,
            gamma, l2_reg, the KL direction and weight, the completion term (:data:`COMPLETION_TERMS`; "l2" is Eq. 9
            as written) and where M is chosen (:data:`SELECTION_RULES`). Each is declared, defaulted and documented
            there once. For "triton" under a selection rule other than "vocab" the ids are computed first
            (:func:`bft.chunked.base_favored_rows`) and given to the kernel.
        **settings: or the same settings by name (``top_k=7, completion="mass"``), the rest at their defaults; not
            together with ``params``. An unknown name raises ``ValueError`` listing the valid ones.
        backend: "auto" | "reference" | "torch" | "triton".
        chunk_rows: rows per chunk for the torch/triton backends (default: sized from a memory budget).
        topk_ids, risk: [N, top_k] int32/int64 and [N] float, given together: the base-favored ids M_n (top-k of
            Δ, in the loss's order) and risk_n computed beforehand from the same aligned and base rows (a teacher
            cache, :func:`bft.chunked.base_favored_rows`). Every backend then skips its own top-k and count and
            uses them; the objective is the same. Only valid rows are read. ``out.topk_ids`` / ``out.risk``
            report them back.

    Returns:
        :class:`BFTLossOutput`. Gradients flow to ``student_hidden`` and ``student_weight`` only.
    """
    tensors = {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "aligned_hidden": aligned_hidden,
        "aligned_weight": aligned_weight,
        "base_hidden": base_hidden,
        "base_weight": base_weight,
    }
    params = resolve_params(params, settings)
    _validate(tensors, harmful, valid, params, backend)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    N = student_hidden.shape[0]
    dev = student_hidden.device
    harmful = torch.zeros(N, dtype=torch.bool, device=dev) if harmful is None else harmful.to(dev)
    valid = torch.ones(N, dtype=torch.bool, device=dev) if valid is None else valid.to(dev)
    backend = resolve_backend(backend, dev)
    _validate_given(topk_ids, risk, valid, N, student_weight.shape[0], params.top_k, dev)
    if backend == "triton" and params.selection != "vocab" and topk_ids is None:
        topk_ids, risk = _selected_rows(tensors, valid, params)  # the row kernel ranks the whole vocabulary only

    if backend == "reference":
        loss, rows = bft_loss_reference(
            **tensors, harmful=harmful, valid=valid, params=params, topk_ids=topk_ids, risk=risk
        )
        return BFTLossOutput(
            loss=loss,
            kl=rows.kl,
            completion=rows.completion,
            risk=rows.risk,
            alpha=rows.alpha,
            topk_ids=rows.topk_ids,
        )
    if backend == "torch":
        from bft.chunked import bft_forward_backward_torch as impl
    else:
        from bft.kernels.bft_loss import bft_forward_backward_triton as impl
    return _run_fused(impl, tensors, harmful, valid, params, topk_ids=topk_ids, risk=risk, chunk_rows=chunk_rows)


class BFTLoss(nn.Module):
    """:func:`bft_loss` as a module holding its settings: one :class:`BFTLossParams` (``params``, or its fields by
    name as ``**settings``, as for :func:`bft_loss`), the backend and the chunk size.

    ``BFTLoss(top_k=100)(student_hidden, student_weight, aligned_hidden, aligned_weight, base_hidden, base_weight,
    harmful=..., valid=..., topk_ids=..., risk=...)`` returns a :class:`BFTLossOutput`.
    """

    def __init__(
        self,
        params: BFTLossParams | None = None,
        *,
        backend: str = "auto",
        chunk_rows: int | None = None,
        **settings,
    ):
        super().__init__()
        self.params = resolve_params(params, settings)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.chunk_rows = chunk_rows

    def forward(
        self,
        student_hidden,
        student_weight,
        aligned_hidden,
        aligned_weight,
        base_hidden,
        base_weight,
        *,
        harmful=None,
        valid=None,
        topk_ids=None,
        risk=None,
    ) -> BFTLossOutput:
        """:func:`bft_loss` with this module's settings; ``topk_ids`` / ``risk``: given base-favored ids and density
        (a teacher cache), as there."""
        return bft_loss(
            student_hidden,
            student_weight,
            aligned_hidden,
            aligned_weight,
            base_hidden,
            base_weight,
            harmful=harmful,
            valid=valid,
            params=self.params,
            backend=self.backend,
            chunk_rows=self.chunk_rows,
            topk_ids=topk_ids,
            risk=risk,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.as_kwargs().items()) + f", backend={self.backend!r}"
