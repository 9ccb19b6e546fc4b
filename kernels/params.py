"""The settings of the BFT objective, declared and validated once, at the lowest layer (the standard library only).

:class:`BFTLossParams` is the one object that carries them: the trainer's YAML ``loss:`` section builds it
(:class:`bft.trainer.config.LossConfig` adds how the loss runs), :func:`bft.bft_loss` / :class:`bft.BFTLoss` take it
(``params=``), and it travels unchanged to every backend: the reference (:mod:`bft.reference`), the chunked torch
backend (:mod:`bft.chunked`) and the Triton driver down to the row kernel's launch (:mod:`bft.kernels.bft_rows`,
which compiles one variant per completion term: its ``COMPLETION`` constexpr is the term's index in
:data:`COMPLETION_TERMS`). The equations are in :mod:`bft.reference` and docs/loss.md.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

#: KL directions: "forward" = τ²·KL(teacher ‖ student) (the default), "reverse" = τ²·KL(student ‖ teacher) (Eq. 14)
KL_DIRECTIONS = ("forward", "reverse")

#: Completion terms on M = TopK(b − a, k), with π = softmax(s) at temperature 1:
#:   "l2"            l2_reg·Σ_{v∈M} s_v²       Eq. 9 as written (pulls every s_v towards 0; the default)
#:   "mass"          Σ_{v∈M} π(v)              lowers the student's probability on M; shift-invariant
#:   "unlikelihood"  −log(1 − Σ_{v∈M} π(v))    the same, with a gradient that does not vanish as π(M) → 1
#:   "log_mass"      max(0, log Σ_{v∈M} π(v) − log completion_floor)
#:                                             lowers log π(M) until π(M) < completion_floor, by an O(1) gradient
#:                                             however small π(M) is (the other two vanish with it)
COMPLETION_TERMS = ("l2", "mass", "unlikelihood", "log_mass")

#: Where M is chosen (docs/loss.md#where-m-is-chosen), with π_b = softmax(b) the base model's distribution:
#:   "vocab"      M = TopK(b − a, k) over the whole vocabulary (Algorithm 1 as written; the default)
#:   "base_topp"  M = TopK(b − a, k) over the base model's plausible tokens: its top-p nucleus (the fewest most
#:                probable tokens whose mass reaches selection_top_p), grown in π_b order to k tokens if smaller
SELECTION_RULES = ("vocab", "base_topp")

DEFAULT_TOP_K = 100
DEFAULT_TEMPERATURE = 2.0
DEFAULT_TEACHER_LAMBDA = 1.2
DEFAULT_ALPHA_BASE = 1.0
DEFAULT_GAMMA = 1.0
DEFAULT_L2_REG = 1e-4
DEFAULT_KL_WEIGHT = 1.0
DEFAULT_SELECTION_TOP_P = 0.9
DEFAULT_COMPLETION_FLOOR = 1e-6


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class BFTLossParams:
    """The objective's settings (paper defaults: k = 100, τ = 2, λ = 1.2; alpha_base, gamma and l2_reg are bft's
    choices, docs/loss.md). Validated on construction: a bad value raises ``ValueError`` naming the field and, for a
    choice, the valid ones. What depends on the vocabulary size is checked by :meth:`check_vocab`.

    top_k:          k of M = TopK(b − a, k), an int >= 1 (and <= V)
    temperature:    τ > 0 of the KL term
    teacher_lambda: λ of the hybrid teacher λ·a + (1 − λ)·b (may exceed 1)
    alpha_base:     α_n = alpha_base·(1 + gamma·risk_n), the completion term's weight on harmful rows; >= 0
    gamma:          >= 0
    l2_reg:         scale of the "l2" completion term (the others are O(1) and ignore it); >= 0
    kl:             one of :data:`KL_DIRECTIONS`
    kl_weight:      weight of KL_n in the loss, finite >= 0 (0: the completion-only ablation)
    completion:     one of :data:`COMPLETION_TERMS` ("l2": Eq. 9 as written)
    selection:      where M is chosen, one of :data:`SELECTION_RULES` ("vocab": the whole vocabulary, as written)
    selection_top_p: p of selection="base_topp", in (0, 1] (read by that rule only)
    completion_floor: p_floor of completion="log_mass", a probability in (0, 1) (read by that term only): the term
                    is max(0, log π(M) − log p_floor), so it stops pushing once M's mass is below p_floor (1e-6)
    """

    top_k: int = DEFAULT_TOP_K
    temperature: float = DEFAULT_TEMPERATURE
    teacher_lambda: float = DEFAULT_TEACHER_LAMBDA
    alpha_base: float = DEFAULT_ALPHA_BASE
    gamma: float = DEFAULT_GAMMA
    l2_reg: float = DEFAULT_L2_REG
    kl: str = "forward"
    kl_weight: float = DEFAULT_KL_WEIGHT
    completion: str = "l2"
    selection: str = "vocab"
    selection_top_p: float = DEFAULT_SELECTION_TOP_P
    completion_floor: float = DEFAULT_COMPLETION_FLOOR

    def __post_init__(self):
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not (_real(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature!r}")
        if not (_real(self.teacher_lambda) and math.isfinite(self.teacher_lambda)):
            raise ValueError(f"teacher_lambda must be a finite number, got {self.teacher_lambda!r}")
        for name in ("alpha_base", "gamma", "l2_reg"):
            value = getattr(self, name)
            if not (_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")
        if not (_real(self.kl_weight) and math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(
                f"kl_weight must be a finite number >= 0 (1 = the full objective, 0 = completion "
                f"only), got {self.kl_weight!r}"
            )
        if self.kl not in KL_DIRECTIONS:
            raise ValueError(f"kl must be one of {KL_DIRECTIONS}, got {self.kl!r}")
        if self.completion not in COMPLETION_TERMS:
            raise ValueError(f"completion must be one of {COMPLETION_TERMS}, got {self.completion!r}")
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"selection must be one of {SELECTION_RULES}, got {self.selection!r}")
        if not (_real(self.selection_top_p) and 0 < self.selection_top_p <= 1):
            raise ValueError(f"selection_top_p must be in (0, 1], got {self.selection_top_p!r}")
        if not (_real(self.completion_floor) and 0 < self.completion_floor < 1):
            raise ValueError(
                f"completion_floor must be a probability in (0, 1) (M's mass below which completion='log_mass' "
                f"stops pushing), got {self.completion_floor!r}"
            )

    def check_vocab(self, V: int) -> None:
        """The checks that need the vocabulary size V."""
        if not 1 <= self.top_k <= V:
            raise ValueError(f"top_k={self.top_k} must be in [1, V={V}]")
        if self.completion == "unlikelihood" and self.top_k >= V:
            raise ValueError(
                f"completion='unlikelihood' needs top_k < V={V}: with M the whole vocabulary "
                "−log(1 − Σ_{v∈M} π(v)) is infinite"
            )

    def as_kwargs(self) -> dict:
        """The objective's settings by name (this class's fields only, also on a subclass such as the trainer's)."""
        return {f.name: getattr(self, f.name) for f in fields(BFTLossParams)}

    def teacher_cache_fields(self) -> dict:
        """The settings a frozen-teacher cache's contents depend on: it stores M and risk (which depends on no
        setting), so top_k and the selection rule. The completion term (and its floor), τ, λ, α, l2_reg, the KL
        direction and weight are all applied to the cached ids at training time and may change under one cache.
        Under the default selection ("vocab") the rule is left out, so a cache built before the rule existed stays
        valid; any other rule adds ``selection`` and its parameter, so a cache built under one rule is refused under
        another."""
        if self.selection == "vocab":
            return {"top_k": self.top_k}
        return {"top_k": self.top_k, "selection": self.selection, "selection_top_p": self.selection_top_p}

    @property
    def completion_code(self) -> int:
        """The row kernel's ``COMPLETION`` constexpr (the term's index in :data:`COMPLETION_TERMS`)."""
        return COMPLETION_TERMS.index(self.completion)
