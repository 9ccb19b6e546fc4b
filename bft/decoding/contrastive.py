"""Inference-time contrastive decoding against the base model (paper Eq. 7, Table 1, Fig. 3).

At every generation step, with ℓ_a = log_softmax(aligned logits) and ℓ_b = log_softmax(base logits) over the
vocabulary, the base-favored set is B = {v : ℓ_b(v) > ℓ_a(v)} (Eq. 6) and the decoded scores are

    ℓ_c(v) = ℓ_a(v) − α · 1[v ∈ B] · (ℓ_b(v) − ℓ_a(v))                                          (Eq. 7)

i.e. every token the base model prefers is pushed down by α times the size of that preference. The decoded
distribution is softmax(ℓ_c) (ℓ_c itself is not normalized).

Two forms, ``form="logprobs"`` (the default) and ``form="logits"`` (the paper as written). The paper states the
penalty on raw logits, "penalty(v) = α·(logit_base(v) − logit_aligned(v)) ... subtracted from original logits
before softmax":

    z_c(v) = z_a(v) − α · 1[v ∈ B] · (z_b(v) − z_a(v))                        (Eq. 7 as written, form="logits")

with z the raw logits and B still defined by probabilities. Since z = ℓ + lse(z), the two forms differ on B by
α·(lse(z_b) − lse(z_a)): a per-row constant that can be large between two models of different sharpness, and that
changes with a reparametrization (adding a constant to one model's logits) that changes neither distribution. On
log-probs the penalty is invariant to such shifts, and B and the penalty use the same quantity; hence the default.
The ranking of Δ = b − a inside a row (used by ``top_k``) is the same in both. Both forms return scores on the
aligned log-prob scale (the logits form shifted by −lse(z_a), which softmax ignores).

Three entry points:

- :func:`contrastive_logprobs` — the formula on [..., V] logits, in fp32.
- :class:`ContrastiveLogitsProcessor` — a ``transformers`` logits processor for ``aligned_model.generate``; it runs
  the base model itself with its own KV cache (after the first call only the new tokens are fed).
- :func:`contrastive_generate` — batched, left-padded greedy or sampled generation with both models cached.

CLI: ``bft generate --aligned M --base M --alpha A --prompts FILE [--prefill TEXT]`` (:mod:`bft.commands.generate`).
"""

from __future__ import annotations

import inspect

import torch

from bft.hf.batching import position_ids
from bft.hf.models import cache_argument, output_cache
from bft.reference import topk_mask_lowest_id_ties

__all__ = [
    "FORMS",
    "contrastive_logprobs",
    "ContrastiveLogitsProcessor",
    "contrastive_generate",
    "check_same_vocab_size",
]

#: The two forms of Eq. 7: the penalty on log-probs (default) or on raw logits (the paper's text).
FORMS = ("logprobs", "logits")


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)} (Eq. 7 on log-probs or on raw logits), got {form!r}")
    return form


def contrastive_logprobs(
    aligned_logits: torch.Tensor,
    base_logits: torch.Tensor,
    alpha: float = 1.0,
    *,
    top_k: int | None = None,
    form: str = "logprobs",
) -> torch.Tensor:
    """Eq. 7 on log-probs: ``ℓ_a − α·1_B·(ℓ_b − ℓ_a)`` with ``B = {v : ℓ_b(v) > ℓ_a(v)}``, over the last dim.

    ``form="logits"``: the paper's form on raw logits, ``z_a − α·1_B·(z_b − z_a)``, returned shifted by
    ``−lse(z_a)`` (so as ``ℓ_a − α·1_B·(ℓ_b − ℓ_a + lse(z_b) − lse(z_a))``; softmax is unchanged).

    ``aligned_logits`` and ``base_logits`` are [..., V] logits (any float dtype; everything is computed in fp32 or
    wider). Returns unnormalized log-scores in fp32; ``softmax`` of them is the decoded distribution. With
    ``top_k``, only base-favored tokens among the top-k of Δ = ℓ_b − ℓ_a (Algorithm 1; ties to the lower id) are
    penalized. ``alpha = 0`` returns ℓ_a. Tokens with ℓ_a = −inf (masked by an earlier processor) stay −inf.
    """
    if aligned_logits.shape != base_logits.shape:
        raise ValueError(
            f"aligned_logits {tuple(aligned_logits.shape)} and base_logits {tuple(base_logits.shape)} differ in shape"
        )
    if aligned_logits.dim() < 1 or aligned_logits.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty vocabulary dim, got shape {tuple(aligned_logits.shape)}")
    alpha = float(alpha)
    if not alpha >= 0.0:  # also rejects NaN
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if top_k is not None and not 1 <= int(top_k) <= aligned_logits.shape[-1]:
        raise ValueError(f"top_k={top_k} must be in [1, V={aligned_logits.shape[-1]}]")
    check_form(form)
    dtype = torch.promote_types(torch.promote_types(aligned_logits.dtype, base_logits.dtype), torch.float32)
    za, zb = aligned_logits.to(dtype), base_logits.to(dtype)
    la = torch.log_softmax(za, dim=-1)
    lb = torch.log_softmax(zb, dim=-1)
    if alpha == 0.0:
        return la
    if form == "logits":
        return _penalize_logits(la, lb, torch.logsumexp(zb, -1) - torch.logsumexp(za, -1), alpha, top_k)
    if top_k is None:
        return _penalize_(la, lb, alpha)
    diff = lb - la
    # finite ℓ_a only: where ℓ_a = −inf, diff = +inf and α·diff would turn −inf into NaN-free −inf anyway, but
    # keeping those entries untouched is explicit and safe for every α.
    favored = (diff > 0) & torch.isfinite(la)
    favored &= topk_mask_lowest_id_ties(torch.nan_to_num(diff, nan=-torch.inf), int(top_k))[0]  # NaN-free here
    return torch.where(favored, la - alpha * diff, la)


def _penalize_logits(la, lb, lse_shift: torch.Tensor, alpha: float, top_k: int | None) -> torch.Tensor:
    """The logits form: on B (by probabilities, optionally cut to the top-k of Δ), ``ℓ_a − α·(z_b − z_a)`` with
    ``z_b − z_a = ℓ_b − ℓ_a + lse_shift``. Entries with ℓ_a = −inf stay −inf."""
    diff = lb - la
    favored = (diff > 0) & torch.isfinite(la)
    if top_k is not None:
        favored &= topk_mask_lowest_id_ties(torch.nan_to_num(diff, nan=-torch.inf), int(top_k))[0]
    return torch.where(favored, la - alpha * (diff + lse_shift.unsqueeze(-1)), la)


def _penalize_(la: torch.Tensor, lb: torch.Tensor, alpha: float) -> torch.Tensor:
    """``where(ℓ_b > ℓ_a and ℓ_a finite, ℓ_a − α·(ℓ_b − ℓ_a), ℓ_a)`` as ``ℓ_a − α·max(ℓ_b − ℓ_a, 0)``, overwriting
    ``lb``.

    Bit for bit the masked form: on base-favored tokens it is the same two roundings (α·diff, then ℓ_a − ·), and
    elsewhere ℓ_a − 0 = ℓ_a. Corner cases agree too: ℓ_a = −inf gives −inf − α·inf = −inf; a NaN difference (ℓ_a
    = ℓ_b = −inf) or α·0 with α = inf gives NaN, which ``nan_to_num_`` turns into a zero penalty, hence ℓ_a. All
    steps are in place and are the cheap vectorized kernels (on CPU ``torch.where``, ``masked_fill`` and ``fmin``
    over [8, 49152] fp32 cost 0.6-1.5 ms each, ``clamp``/``mul``/``sub`` ~0.03 ms): on one CPU thread at
    [8, 49152] the whole of :func:`contrastive_logprobs` went from ~2.9 to ~0.5 ms, two ``log_softmax`` included.
    """
    d = lb.sub_(la).clamp_(min=0.0).mul_(alpha).nan_to_num_(nan=0.0, posinf=torch.inf, neginf=-torch.inf)
    return torch.sub(la, d, out=d)


class ContrastiveLogitsProcessor:
    """A ``transformers`` logits processor that applies Eq. 7 against ``base_model`` (see module docstring).

    Use it in ``aligned_model.generate(..., logits_processor=LogitsProcessorList([proc]))``. It runs the base model
    on the same sequences with its own KV cache: the first call feeds the whole prompt, later calls only the
    tokens appended since the previous call. If the sequences seen do not extend the cached ones (a new
    ``generate`` call, beam reordering), the cache is rebuilt from scratch, so results stay exact.

    Padding: the processor does not see ``generate``'s attention mask. For left-padded batches pass the prompt's
    ``attention_mask`` (or call :meth:`reset` with it before each ``generate``); ``pad_token_id`` is a fallback
    that marks pad tokens in the prompt as padding (ambiguous when pad == eos, hence the explicit mask).
    Tokens appended by ``generate`` (including pads after a row finished) are attended, as ``generate`` does.

    ``first_n``: penalize only the first n generated positions (counted from the prompt given to ``generate``,
    i.e. after any prefilled response prefix); later positions return plain ℓ_a. ``top_k``: penalize only
    base-favored tokens among the top-k of Δ (Algorithm 1).

    Returned scores are the unnormalized log-scores of Eq. 7 (fp32). In ``generate`` the user processors run after
    the built-in ones (repetition penalty, bad words, ...), which therefore act on the aligned scores only, and
    before the sampling warpers (temperature, top-k, top-p), which act on the contrastive scores: temperature T
    samples from softmax(ℓ_c / T) and top-p truncates the contrastive distribution.
    """

    def __init__(
        self,
        base_model,
        alpha: float = 1.0,
        first_n: int | None = None,
        top_k: int | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        form: str = "logprobs",
    ):
        self.form = check_form(form)
        alpha = float(alpha)
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if first_n is not None and int(first_n) < 0:
            raise ValueError(f"first_n must be >= 0 or None, got {first_n}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.base_model = base_model
        self._cache_argument = cache_argument(base_model)  # "cache" or "past_key_values", by transformers release
        self.alpha = alpha
        self.first_n = None if first_n is None else int(first_n)
        self.top_k = None if top_k is None else int(top_k)
        self.pad_token_id = pad_token_id
        self.base_forward_tokens = 0  # tokens fed to the base model so far (for tests and benchmarks)
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Drop the base model's cache; ``attention_mask`` is the [B, L] mask of the next ``generate``'s prompt."""
        self._prompt_mask = None if attention_mask is None else attention_mask.detach()
        self._cache = None
        self._seen_ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None  # [B, 1] position id of the next token of each row
        self._device: torch.device | None = None
        self._prompt_len = 0

    def _full_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Attention mask for ``input_ids``: the prompt mask (extended with ones for tokens generate appended),
        else ``input_ids != pad_token_id``, else all ones."""
        B, L = input_ids.shape
        if self._prompt_mask is not None:
            m = self._prompt_mask.to(input_ids.device).long()
            if m.shape[0] != B or m.shape[1] > L:
                raise ValueError(
                    f"attention_mask {tuple(m.shape)} does not match the batch {tuple(input_ids.shape)} seen by the "
                    "processor: call reset(attention_mask) with the mask of the prompt passed to generate"
                )
            return torch.cat([m, m.new_ones(B, L - m.shape[1])], dim=1)
        if self.pad_token_id is not None:
            return (input_ids != self.pad_token_id).long()
        return torch.ones_like(input_ids, dtype=torch.long)

    def _forward(self, new_ids: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
        """Base logits [B, V] at the last position after feeding ``new_ids`` [B, n]; ``full_mask`` [B, past + n] is on
        the base model's device. Without a cache (first call, rebuild), ``new_ids`` is the whole sequence."""
        from transformers import DynamicCache

        n_new = new_ids.shape[1]
        if self._cache is None:  # the whole sequence
            self._cache = DynamicCache()
            pos = position_ids(full_mask)
            self._next_pos = full_mask.sum(-1, keepdim=True)
        else:
            # appended tokens are all attended, so for them cumsum(mask) − 1 is the number of attended tokens
            # before them: continue from that count instead of a cumsum over the whole [B, L] mask every step
            pos = self._next_pos + torch.arange(n_new, device=full_mask.device)
            self._next_pos = self._next_pos + n_new
        out = self.base_model(
            input_ids=new_ids.to(self._device),
            attention_mask=full_mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: self._cache},
        )
        self._cache = output_cache(out)
        self.base_forward_tokens += int(new_ids.numel())
        return out.logits[:, -1, :]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        seen = self._seen_ids
        same_batch_longer = seen is not None and seen.shape[0] == B and seen.shape[1] < L
        # one [B, L] integer comparison per step; it is what makes the cache safe under beam reordering or a new
        # generate call with a longer prompt (on CUDA it is a sync, as generate's own stopping check is)
        extends = same_batch_longer and torch.equal(seen, input_ids[:, : seen.shape[1]])
        if extends and self.first_n is not None and L - self._prompt_len >= self.first_n:
            # past the first n positions the base model is not needed any more: skip its forward
            self._seen_ids = input_ids.detach().clone()
            return torch.log_softmax(scores.float(), dim=-1)
        if extends:
            # the usual step: feed only the tokens generate appended since the last call
            n_new = L - seen.shape[1]
            self._mask = torch.cat([self._mask, self._mask.new_ones(B, n_new)], dim=1)
            base_logits = self._forward(input_ids[:, -n_new:], self._mask)
        else:
            if not same_batch_longer:  # a new generate call: generated positions count from this prompt
                self._prompt_len = L
            # else: the sequences changed under us (e.g. beams reordered); recompute exactly from scratch
            self._cache = None
            self._device = next(self.base_model.parameters()).device
            self._mask = self._full_mask(input_ids).to(self._device)
            base_logits = self._forward(input_ids, self._mask)
        self._seen_ids = input_ids.detach().clone()
        if self.first_n is not None and L - self._prompt_len >= self.first_n:
            return torch.log_softmax(scores.float(), dim=-1)
        return _contrastive_scores(scores, base_logits, self.alpha, self.top_k, self.form)

    # LogitsProcessorList calls inspect.signature(processor.__call__) at every step; a precomputed signature makes
    # that a lookup (inspect honours __signature__) instead of a walk over the function's code object.
    __call__.__signature__ = inspect.signature(__call__)


def _contrastive_scores(
    scores: torch.Tensor, base_logits: torch.Tensor, alpha: float, top_k: int | None, form: str = "logprobs"
):
    """Eq. 7 on ``generate``'s scores; handles a padded lm_head on either side by using the shared width.

    Columns only the aligned head has (padding beyond the shared vocabulary) get −inf: no base counterpart exists
    and they are not real tokens.
    """
    base_logits = base_logits.to(scores.device)
    Va, Vb = scores.shape[-1], base_logits.shape[-1]
    V = min(Va, Vb)
    out = contrastive_logprobs(scores[..., :V], base_logits[..., :V], alpha, top_k=top_k, form=form)
    if Va > V:
        pad = out.new_full((*out.shape[:-1], Va - V), -torch.inf)
        out = torch.cat([out, pad], dim=-1)
    return out


def contrastive_generate(
    aligned_model,
    base_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    first_n: int | None = None,
    favored_top_k: int | None = None,
    form: str = "logprobs",
    **generate_kwargs,
):
    """Generate from ``aligned_model`` with Eq. 7 contrastive decoding against ``base_model``.

    ``input_ids`` [B, L] left-padded prompts with their ``attention_mask``; ``generate_kwargs`` go to
    ``aligned_model.generate`` (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``logits_processor``
    (appended before ours), ``return_dict_in_generate``...). Both models keep KV caches. Returns what
    ``generate`` returns: by default the [B, L + new] sequences (prompt followed by new tokens).
    ``first_n`` and ``favored_top_k`` are the processor's ``first_n`` and ``top_k`` (named so here because
    ``top_k`` is ``generate``'s own sampling top-k, which passes through). ``form`` picks Eq. 7 on log-probs
    (default) or on raw logits (the paper's text; see the module docstring). Beam search is refused.
    """
    from transformers import LogitsProcessorList

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if int(generate_kwargs.get("num_beams", 1) or 1) != 1:
        raise ValueError("contrastive_generate supports greedy and sampling only (num_beams=1)")
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded (attention_mask is 0 in the last column for some row)")
    check_same_vocab_size(aligned_model, base_model)
    proc = ContrastiveLogitsProcessor(
        base_model, alpha=alpha, first_n=first_n, top_k=favored_top_k, attention_mask=attention_mask, form=form
    )
    user = generate_kwargs.pop("logits_processor", None)
    processors = LogitsProcessorList(list(user or []) + [proc])
    device = next(aligned_model.parameters()).device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return aligned_model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            logits_processor=processors,
            **generate_kwargs,
        )


def check_same_vocab_size(aligned_model, base_model) -> None:
    """Cheap guard used before decoding: the two output heads must cover the same vocabulary (padding aside).

    Tokenizer identity is checked by :func:`bft.hf.models.check_same_vocab` in the CLIs; here only the models are at
    hand, so we require that one head is at most a padded version of the other (same size after rounding up to a
    multiple of 64 is the common case, e.g. 49152 vs 49216) — differing real vocabularies are usually far apart.
    """
    va = aligned_model.get_output_embeddings().weight.shape[0]
    vb = base_model.get_output_embeddings().weight.shape[0]
    if va != vb and abs(va - vb) >= 256:
        raise ValueError(
            f"aligned and base models have different vocabularies ({va} vs {vb} output rows); contrastive decoding "
            "needs the same tokenizer for both"
        )
