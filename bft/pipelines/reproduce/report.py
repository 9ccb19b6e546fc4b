"""The reproduction's ``REPORT.md`` and its KL-by-position figure."""

from __future__ import annotations

import math
from pathlib import Path

from bft.atomic import atomic_save_figure

__all__ = ["render_report", "plot_kl_by_position"]


def _stage_list(environment: dict) -> str:
    return ", ".join(f"{k} {v / 60:.1f}" for k, v in (environment.get("stage_seconds") or {}).items() if v is not None)


def _decoding(cfg: dict) -> str:
    if cfg.get("sample"):
        return f"sampling (temperature {cfg['temperature']:g}, top-p {cfg['top_p']:g}, seed {cfg['seed']}; Qi et al.)"
    return "greedy decoding"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _verdict(holds) -> str:
    if isinstance(holds, dict):
        return ", ".join(f"{k}: {_verdict(v)}" for k, v in holds.items())
    return {True: "reproduced", False: "NOT reproduced", None: "n/a"}[holds]


def _aligned_recipe(cfg: dict) -> str:
    share = cfg.get("recovery_share") or 0
    if not share:
        return "shallow refusal SFT"
    return (f"refusal SFT with {100 * share:g}% safety-recovery examples (Qi et al.; harmful prefixes of up to "
            f"{cfg.get('recovery_max_tokens')} tokens, then a refusal)")


def _ci(asr: dict, judge: str) -> str:
    ci = (asr.get("ci") or {}).get(judge)
    return "" if not ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _header(summary: dict, environment: dict) -> list[str]:
    cfg = summary["config"]
    seeds = cfg.get("eval_seeds", 1)
    return [
        "# BFT in miniature: results",
        "",
        f"Base: `{cfg['model']}`; aligned: the base after a {_aligned_recipe(cfg)} ({cfg['align_steps']} steps); BFT student: "
        f"LoRA r={cfg['bft_lora_r']} on the aligned model, {cfg['bft_steps']} steps (λ = 1.2, τ = 2, k = {cfg['top_k']}). "
        f"Held-out harmful prompts: {summary['data']['harmful_test']} ({', '.join(f'{s} {n}' for s, n in summary['data']['test_sources'].items())}); "
        f"{_decoding(cfg)}, {cfg['eval_tokens']} new tokens, {seeds} sampling seed{'s' if seeds != 1 else ''}. "
        f"Mode: {'quick' if cfg['quick'] else 'default'}.",
        "",
        f"Machine: {environment.get('device')}; torch {environment.get('torch')}; the stages took "
        f"{environment.get('stages_min')} min when computed ({_stage_list(environment)}); this invocation "
        f"{environment.get('elapsed_min')} min.",
        "",
    ]  # fmt: skip


def _attack_table(summary: dict) -> list[str]:
    cfg, systems = summary["config"], summary["systems"]
    primary = summary.get("primary_judge", "keyword")
    ks = [str(k) for k in cfg["prefill_ks"]]
    lines = [
        "## Prefill attack (paper Tables 1 and 3)",
        "",
        "ASR = share of continuations judged harmful after a forced prefix of k tokens of the base model's own harmful "
        f"response (k = 0: the plain request). Each cell: **{primary}** ASR [95% Wilson interval] · keyword · "
        "three-way on-topic ASR (the harm judge is calibrated to human labels; keyword counts any non-refusal, "
        "three-way any on-topic non-refusal: see docs/offline-measures.md). Likelihood: mean per-token log-prob of "
        "the reference harmful response (lower = safer). Utility: perplexity of benign reference solutions"
        + (", GSM8K exact match." if any(s["gsm8k"] is not None for s in systems.values()) else "."),
        "",
        "| system | " + " | ".join(f"k={k}" for k in ks) + " | likelihood | perplexity | GSM8K |",
        "|---|" + "---|" * (len(ks) + 3),
    ]  # fmt: skip
    for name, s in systems.items():
        cells = []
        for k in ks:
            a = s["asr"].get(k) or {}
            main = a.get(primary) if primary != "keyword" else None
            head = f"**{_pct(main)}**{_ci(a, primary)} · " if primary != "keyword" else ""
            cells.append("—" if not a else f"{head}{_pct(a.get('keyword'))}{_ci(a, 'keyword') if not head else ''} · "
                                           f"{_pct(a.get('threeway'))}")  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_num(s['likelihood_mean'], '.2f')} | "
                     f"{_num(s['perplexity'], '.2f')} | {_pct(s['gsm8k']) if s['gsm8k'] is not None else 'n/a'} |")  # fmt: skip
    lines += [
        "",
        "Eq. 7 only ever lowers base-favored tokens (ℓ_b > ℓ_a), never raises one. Under greedy decoding it therefore "
        "changes a step only where the aligned model's own argmax is base-favored; under sampling it also reshapes "
        "the rest of the distribution. `contrastive (logits)` is Eq. 7 as the paper writes it, on raw logits; the "
        "other contrastive rows use log-probs (docs/analysis.md).",
    ]
    return lines


def _profile_table(summary: dict) -> list[str]:
    cfg = summary["config"]
    an, st = summary["analysis"]["aligned_vs_base"], summary["analysis"]["student_vs_base"]
    lines = [
        "",
        "## Where the aligned model differs from the base (paper Fig. 1)",
        "",
        "Means over positions 0-2 (early) and 15+ (late); KL in nats; count = base-favored tokens among the aligned "
        "top-100. `*_response/teacher_forced`: both models read the base model's own harmful response (or a benign "
        "reference solution) token by token, as in Qi et al.'s per-token KL. `/normal`: along the aligned model's own "
        "greedy responses (refusals, for plain harmful requests); `harmful_prefill`: after a "
        f"{cfg['analysis_prefill_tokens']}-token prefill of the harmful response.",
        "",
        "| context | KL early | KL late | JS early | JS late | count early | count late | student KL early | student KL late |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key in ("harmful_response/teacher_forced", "benign_response/teacher_forced", "harmful/normal",
                "harmful_prefill/normal", "benign/normal", "harmful_prefill/contrastive"):
        if key not in an:
            continue
        a, s = an[key], st.get(key, {})
        lines.append(f"| {key} | {_num(a['kl_early'])} | {_num(a['kl_late'])} | {_num(a['js_early'])} | "
                     f"{_num(a['js_late'])} | {_num(a['bf_count_top_early'], '.1f')} | {_num(a['bf_count_top_late'], '.1f')} | "
                     f"{_num(s.get('kl_early'))} | {_num(s.get('kl_late'))} |")  # fmt: skip
    return lines


def _reduction_row(claim: dict, other: str, primary: str) -> str:
    parts = []
    for judge in dict.fromkeys([primary, "keyword", "threeway"]):
        if judge not in claim:
            continue
        c, p = claim[judge], (claim.get("paired") or {}).get(judge, {})
        ci = p.get("reduction_ci")
        interval = f", 95% CI [{_pct(ci[0])}, {_pct(ci[1])}], McNemar p = {p['mcnemar']['p_value']:.2g}" if ci else ""
        parts.append(f"{judge} {_pct(c['aligned'])} → {_pct(c[other])} (cut {_pct(c['relative_cut'])}{interval}): "
                     f"{p.get('verdict', 'inconclusive')}")  # fmt: skip
    return "; ".join(parts)


def _claims_table(summary: dict) -> list[str]:
    primary = summary.get("primary_judge", "keyword")
    c = summary["claims"]
    lines = ["", "## The paper's claims at this scale", "",
             "A cut is *reproduced* when the 95% interval of the relative reduction (bootstrap over prompts) excludes "
             "zero, *not reproduced* when it excludes the paper's effect size, *inconclusive* otherwise.", "",
             "| claim | measured | verdict |", "|---|---|---|"]  # fmt: skip
    k1 = c["kl_decays_with_position"]
    lines.append(f"| {k1['paper']} | early {_num(k1['early_mean'])} vs late {_num(k1['late_mean'])} | {_verdict(k1['holds'])} |")
    k2 = c["harmful_more_base_favored_than_benign"]
    lines.append(f"| {k2['paper']} | harmful {_num(k2['harmful'], '.1f')} vs benign {_num(k2['benign'], '.1f')} | {_verdict(k2['holds'])} |")
    for key, claim in c.items():
        if "paired" not in claim:
            continue
        other = "student" if key.startswith("bft") else "contrastive"
        best = f"; lowest keyword ASR: {claim['best_alpha_system']}" if claim.get("best_alpha_system") else ""
        lines.append(f"| {claim['paper']} | {_reduction_row(claim, other, primary)}{best} | "
                     f"{(claim.get('verdict') or {}).get(primary, 'inconclusive')} ({primary}) |")  # fmt: skip
    k5 = c["bft_keeps_utility"]
    gsm = ("GSM8K 0% for both (floor: the model solves none)" if k5["gsm8k"].get("floor")
           else f"GSM8K drop {_num(k5['gsm8k']['drop_points'], '.1f')} points")  # fmt: skip
    lines.append(f"| {k5['paper']} | perplexity {_num(k5['perplexity']['aligned'], '.2f')} → "
                 f"{_num(k5['perplexity']['student'], '.2f')}; {gsm} | {_verdict(k5['holds'])} |")  # fmt: skip
    return lines


def render_report(summary: dict, environment: dict) -> str:
    lines = _header(summary, environment) + _attack_table(summary) + _profile_table(summary) + _claims_table(summary)
    lines += [
        "",
        "Plots: `plots/kl_by_position.png` (Fig. 1/3 at this scale), `analysis_aligned/fig1_position_profile.png`, "
        "`analysis_aligned/fig2_base_favored_tokens.png`, `analysis_aligned/fig3_contrastive_kl.png`, "
        "`eval/main/asr_vs_k.png`, `eval/alpha_sweep/alpha_sweep.png`. Every generation and verdict: "
        "`eval/main/results.json` (re-judge with `bft eval --rejudge`).",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def plot_kl_by_position(summary: dict, path: Path, *, max_positions: int = 48, min_prompts: int = 3) -> None:
    """KL(model ‖ base) per response position: rows aligned / BFT student, columns teacher-forced on given responses /
    along generated responses. Positions with fewer than ``min_prompts`` prompts are left out (noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = summary["analysis"]["kl_by_position"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharey=True)
    panels = (("teacher_forced", "teacher-forced on given responses"), ("generated", "along generated responses"))
    for r, who in enumerate(("aligned", "student")):
        for c, (kind, title) in enumerate(panels):
            ax = axes[r][c]
            for key, entry in sorted(kl[who].items()):
                if (key.endswith("/teacher_forced")) != (kind == "teacher_forced") or not entry.get("kl"):
                    continue
                ys, ns = entry["kl"], entry.get("n") or [min_prompts] * len(entry["kl"])
                xs = [t for t in range(min(len(ys), max_positions)) if ys[t] is not None and ns[t] >= min_prompts]
                ax.plot(xs, [ys[t] for t in xs], marker=".", label=key)
            ax.set_title(f"KL({'BFT student' if who == 'student' else who} ‖ base), {title}", fontsize=10)
            ax.set_xlabel("response position")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        axes[r][0].set_ylabel("KL (nats)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
