"""The names every backend of the BFT objective agrees on, at the lowest layer (the standard library only).

The reference (:mod:`bft.reference`), the chunked torch backend (:mod:`bft.chunked`) and the Triton row kernel
(:mod:`bft.kernels.bft_rows`, which compiles one variant per term: its ``COMPLETION`` constexpr is the term's index
here) all read these tuples, so a name means the same term everywhere. The equations are in
:mod:`bft.reference` and docs/loss.md.
"""

from __future__ import annotations

#: KL directions: "forward" = τ²·KL(teacher ‖ student) (the default), "reverse" = τ²·KL(student ‖ teacher) (Eq. 14)
KL_DIRECTIONS = ("forward", "reverse")

#: Completion terms on M = TopK(b − a, k), with π = softmax(s) at temperature 1:
#:   "l2"            l2_reg·Σ_{v∈M} s_v²       Eq. 9 as written (pulls every s_v towards 0; the default)
#:   "mass"          Σ_{v∈M} π(v)              lowers the student's probability on M; shift-invariant
#:   "unlikelihood"  −log(1 − Σ_{v∈M} π(v))    the same, with a gradient that does not vanish as π(M) → 1
COMPLETION_TERMS = ("l2", "mass", "unlikelihood")


def completion_code(completion: str) -> int:
    """The row kernel's ``COMPLETION`` constexpr for a term name (its index in :data:`COMPLETION_TERMS`)."""
    if completion not in COMPLETION_TERMS:
        raise ValueError(f"completion must be one of {COMPLETION_TERMS}, got {completion!r}")
    return COMPLETION_TERMS.index(completion)
