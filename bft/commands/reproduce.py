"""``bft reproduce``: the paper in miniature on a real model, offline (analysis, attacks, BFT; cached stages)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bft.config import accept_overrides, apply_overrides, build_dataclass, load_yaml_mapping
from bft.pipelines.reproduce import ReproduceConfig, paper_config, quick_config, rejudge_stored, reproduce, validate
from bft.pipelines.reproduce.config import DEFAULT_SWEEP, default_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default runs/reproduce, runs/demo for --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes: ~10 min on 2 CPU cores (the demo)")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the powered protocol (20 epochs, the sweep, 200 test prompts x 3 seeds): a GPU job",
    )
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="re-score every stored attack with the current judges (no generation), then rebuild the report",
    )
    parser.add_argument(
        "--resummarize",
        action="store_true",
        help="re-apply the verdict rules to the stored summary.json of --out (no rows needed) and rewrite it and "
        "REPORT.md; prints each verdict that changed",
    )
    parser.add_argument(
        "--render-readme",
        action="store_true",
        help="rewrite README.md's Results section from docs/results/**/summary.json (in the current directory)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="sweep the BFT loss on the validation split (alpha_base x l2_reg, lambda) and ablate",
    )
    parser.add_argument("--model", help="base chat model: alias, hub id or local path (default smollm2, offline)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--n-train", type=int, help="harmful training prompts")
    parser.add_argument("--n-test", type=int, help="held-out harmful prompts")
    parser.add_argument("--align-steps", type=int, help="steps of the shallow refusal SFT")
    parser.add_argument("--bft-steps", type=int, help="BFT training steps")
    parser.add_argument("--bft-lr", type=float)
    parser.add_argument("--eval-tokens", type=int, help="new tokens per attacked continuation")
    parser.add_argument("--prefill-ks", help="comma-separated prefill lengths, e.g. 0,4,10,20")
    parser.add_argument("--alphas", help="comma-separated α of the contrastive sweep")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--config", help="YAML file of ReproduceConfig keys (flags and KEY=VALUE override it)")
    accept_overrides(parser)


def config_from_args(args) -> ReproduceConfig:
    """:class:`ReproduceConfig` from ``--quick`` sizes (or the defaults), then the ``--config`` file, the flags and
    ``KEY=VALUE`` overrides (``bft_steps=40 loss_overrides.l2_reg=1e-3``), in that order, via :mod:`bft.config`."""
    data = load_yaml_mapping(args.config) if getattr(args, "config", None) else {}
    for name in (
        "model",
        "device",
        "seed",
        "n_train",
        "n_test",
        "align_steps",
        "bft_steps",
        "bft_lr",
        "eval_tokens",
        "batch_size",
    ):
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if getattr(args, "prefill_ks", None):
        data["prefill_ks"] = [int(k) for k in args.prefill_ks.split(",") if k.strip()]
    if getattr(args, "alphas", None):
        data["alphas"] = [float(a) for a in args.alphas.split(",") if a.strip()]
    data = apply_overrides(data, getattr(args, "overrides", None) or [])
    quick = bool(getattr(args, "quick", False) or data.get("quick"))
    paper = bool(getattr(args, "paper", False))
    if quick and paper:
        raise ValueError("--quick and --paper are two different sizes; choose one")
    completion = (data.get("loss_overrides") or {}).get("completion", "l2")
    if getattr(args, "sweep", False) and "sweep" not in data:
        data["sweep"] = default_sweep(completion)
    data["out"] = args.out or data.get("out") or ("runs/demo" if quick else "runs/reproduce")
    base = quick_config() if quick else paper_config() if paper else ReproduceConfig()
    if "sweep" not in data and base.sweep == DEFAULT_SWEEP:  # --paper's sweep: no l2_reg axis for another term
        data["sweep"] = default_sweep(completion)
    cfg = build_dataclass(ReproduceConfig, {**base.to_dict(), **data})
    validate(cfg)
    return cfg


def resummarize(folder: str | Path) -> list[str]:
    """Re-apply the verdict rules (:func:`bft.pipelines.reproduce.summary.apply_rules`, and for a frontier
    :func:`bft.pipelines.reproduce.frontier.rejudge`) to ``folder/summary.json`` and rewrite it, ``folder/REPORT.md``
    and, when present, ``folder/frontier/summary.json``, ``FRONTIER.md`` and the frontier plots (their intervals may
    have changed); returns the verdicts that changed."""
    from bft.atomic import atomic_write_json, atomic_write_text
    from bft.pipelines.reproduce.frontier import plot_analog, rejudge, render_frontier
    from bft.pipelines.reproduce.report import render_report
    from bft.pipelines.reproduce.summary import apply_rules, verdict_changes

    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resummarize needs a summary.json in {folder}; none found")
    try:
        before = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    after = apply_rules(before)
    changes = verdict_changes(before, after)
    if "frontier" in after:
        after["frontier"] = rejudge(after["frontier"])
        for analog, res in after["frontier"].get("analogs", {}).items():
            was = before["frontier"]["analogs"].get(analog, {}).get("beyond_qi", {})
            for utility, b in res.get("beyond_qi", {}).items():
                old = (was.get(utility) or {}).get("verdict")
                if old != b["verdict"]:
                    changes.append(f"frontier / {analog} / {utility}: {old} → {b['verdict']}")
            judged = next(iter(res.get("beyond_qi", {}).values()), None)
            if res.get("plot") and judged:
                plot_analog(res, Path(folder), analog, judge=judged["judge"], k=judged["k"])
        own = Path(folder) / "frontier"
        if (own / "summary.json").is_file():
            atomic_write_json(own / "summary.json", after["frontier"], indent=1)
            atomic_write_text(own / "FRONTIER.md", render_frontier({"frontier": after["frontier"]}))
    atomic_write_json(path, after, indent=1)
    atomic_write_text(Path(folder) / "REPORT.md", render_report(after, after.get("environment") or {}))
    return changes


def run(args) -> int:
    if getattr(args, "render_readme", False):
        from bft.pipelines.reproduce.readme import main as render_readme

        return render_readme([])
    if getattr(args, "resummarize", False):
        folder = args.out or "runs/reproduce"
        changes = resummarize(folder)
        print(f"bft reproduce --resummarize: {folder}: {len(changes)} verdict(s) changed", file=sys.stderr)
        for line in changes:
            print(line)
        return 0
    cfg = config_from_args(args)
    print(f"bft reproduce: {'quick' if cfg.quick else 'default'} mode, output in {cfg.out}", file=sys.stderr)
    if getattr(args, "rejudge", False):
        if not (Path(cfg.out) / "data" / "stage.json").is_file():
            raise FileNotFoundError(f"--rejudge needs a finished run in {cfg.out}; none found")
        rejudge_stored(cfg)
    summary = reproduce(cfg)
    if summary.get("stopped_after"):
        print(
            f"Stopped after the {summary['stopped_after']} (stop_after): the sweep's table and choice in "
            f"{Path(cfg.out) / 'sweep' / 'chosen.json'}, each point's completion pull in "
            f"{Path(cfg.out) / 'sweep' / '<point>' / 'pull'}; numbers in {Path(cfg.out) / 'summary.json'} "
            f"(this invocation {summary['environment']['elapsed_min']} min)"
        )
        return 0
    print((Path(cfg.out) / "REPORT.md").read_text())
    print(
        f"Report: {Path(cfg.out) / 'REPORT.md'}; plots in {Path(cfg.out) / 'plots'} and each analog's folder; "
        f"numbers in {Path(cfg.out) / 'summary.json'} (this invocation {summary['environment']['elapsed_min']} min)"
    )
    return 0
