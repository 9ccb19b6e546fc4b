"""Analysis: the position-wise aligned-vs-base profile (paper Algorithm 1, Fig. 1-3).

- :mod:`.positions` — the per-position metrics, generated and teacher-forced records, their summary;
- :mod:`.completion` — which way the completion penalty (Eq. 9) pulls the base-favored tokens;
- :mod:`.plots` — the figures and ``analysis.json``.
"""

from bft.analysis.completion import completion_pull, completion_pull_metrics
from bft.analysis.plots import plot_analysis, write_analysis
from bft.analysis.positions import (
    METRICS,
    analyze_pair,
    position_metrics,
    score_responses,
    summarize,
    teacher_forced_logits,
    teacher_forced_records,
)

__all__ = [
    "METRICS",
    "position_metrics",
    "score_responses",
    "analyze_pair",
    "teacher_forced_records",
    "summarize",
    "teacher_forced_logits",
    "completion_pull",
    "completion_pull_metrics",
    "plot_analysis",
    "write_analysis",
]
