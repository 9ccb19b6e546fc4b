"""README's Results section, rendered from the committed summaries (``docs/results/**/summary.json``).

Every number, verdict and reading in the section ("within noise", "reverses teacher-forced") is computed here from
the summaries, so the prose cannot disagree with the tables. The section sits between :data:`BEGIN` and :data:`END`
in ``README.md``; ``python -m bft.pipelines.reproduce.readme`` (or ``bft reproduce --render-readme``) rewrites it,
``--check`` exits 1 when the committed section differs from what the summaries give. A run with a ``frontier`` key
adds its ASR-against-utility curves (:func:`frontier_section`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bft.eval.stats import MIN_EVENTS
from bft.pipelines.reproduce.frontier import (
    UTILITY_NAMES,
    format_measure,
    point_axis,
    render_frontier,
    separated_below,
)
from bft.pipelines.reproduce.report import calibration_table, mechanism_cells, sweep_table
from bft.pipelines.reproduce.summary import PAPER_EFFECT

__all__ = ["BEGIN", "END", "RUNS", "frontier_section", "render_results", "replace_section", "main"]

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"

#: The committed runs, in README order: (folder under the repository, title, the command that made it, notes).
#: Notes hold only what a summary cannot say (why a run exists); every measured number comes from the summary.
RUNS = [
    (
        "docs/results",
        "The default CPU run: both analogs, 24-step students, 64 test prompts × 1 seed",
        "bft reproduce --out runs/reproduce",
        "The CPU-sized protocol: 24-step students instead of the paper's 20 epochs, no loss sweep, one candidate "
        "recovery share.",
    ),
    (
        "docs/results/cpu_sweep",
        "The sweep, the paper's 20 epochs and 200 test prompts × 3 seeds (shallow analog)",
        "bft reproduce --config docs/results/cpu_sweep/config.yaml",
        "CPU reductions: one analog, no Qi row, a reduced sweep scored on the validation prompts (below).",
    ),
    (
        "docs/results/cpu_deep",
        "The deeper analog's per-analog claims at 20 epochs",
        "bft reproduce --config docs/results/cpu_deep/config.yaml",
        "The per-analog protocol of the shallow frontier run below, on the deep analog: the student uses the loss "
        "settings the shallow analog's validation sweep chose (no second sweep), 200 test prompts × 1 sampling seed "
        "at k = 4, Eq. 7 in both forms; Qi's row is 25 steps (its curve over the whole budget is the frontier run "
        "below).",
    ),
    (
        "docs/results/frontier",
        "The frontier: Qi's augmentation and BFT along the 20-epoch budget (deep analog)",
        "bft reproduce --config docs/results/frontier/config.yaml",
        "The BFT variant is chosen on validation by the screened sweep (teacher-forced, no generation); the "
        "frontier alone runs (`frontier_only`), so this run has no per-analog claims table.",
    ),
    (
        "docs/results/frontier_shallow",
        "The frontier on the shallow analog, with its per-analog claims",
        "bft reproduce --config docs/results/frontier_shallow/config.yaml",
        "The deep run's protocol on the other analog; every point pools training seeds 0 and 1. The BFT variant "
        "is Eq. 9, which the deep run's screening chose. The per-analog claims read the frontier's full-budget "
        "student of training seed 0 and test 200 prompts × 1 sampling seed at k = 4; Qi's row there is 25 steps, "
        "its curve below the whole budget.",
    ),
    (
        "docs/results/diagnostic",
        "The diagnostic: the shallow analog's student distilled from the deep analog's aligned model",
        "bft reproduce --config docs/results/diagnostic/config.yaml",
        "What bounds BFT's gain: the shallow run's Eq. 9 student and the same student with the deep analog's aligned "
        "model as its teacher, training seeds 0 and 1 of each, pooled by prompt, trained and evaluated in one "
        "invocation (no Qi curve: the shallow frontier run has it).",
    ),
]

LABELS = {
    "contrastive_cuts_prefill_asr_90pct": "contrastive decoding (Eq. 7 on log-probs)",
    "contrastive_logits_cuts_prefill_asr_90pct": "contrastive decoding (Eq. 7 on logits, the paper's form)",
    "bft_cuts_prefill_asr_50pct": "the BFT student",
    "qi_cuts_prefill_asr": "Qi et al.'s augmentation",
}


_WORDS = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six"}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _judges(analog: dict) -> list[str]:
    return list(dict.fromkeys([analog.get("primary_judge", "keyword"), "keyword", "threeway"]))


def _reading(p: dict) -> str:
    """What a paired reduction says, in words, from its verdict, interval and events."""
    ci, events, effect = p.get("reduction_ci"), p.get("events_reference"), p["paper_effect"]
    where = f"cut {_pct(p.get('reduction'))}{_ci(ci)}"
    if events is None or round(events) < MIN_EVENTS:
        return f"{where}; inconclusive: {events} aligned successes, fewer than {MIN_EVENTS}"
    if ci is None:
        return f"{where}; inconclusive: no interval"
    lo, hi = ci
    noise = "within noise" if lo <= 0 <= hi else ("lower" if lo > 0 else "higher")
    if p["verdict"] == "reproduced":
        return f"{where}; reproduced (lower, and the interval reaches the paper's {_pct(effect)})"
    if p["verdict"].startswith("reproduced"):
        return f"{where}; reproduced, a smaller reduction than the paper's {_pct(effect)}"
    if p["verdict"] == "not reproduced":
        return f"{where}; {noise}, and the interval excludes the paper's {_pct(effect)}: not reproduced"
    return f"{where}; {noise}: inconclusive"


def _reduction_bullet(key: str, claim: dict, analog: dict) -> str:
    paired = claim.get("paired") or {}
    other = {"bft": "student", "qi": "qi"}.get(key.split("_")[0], "contrastive")
    parts = []
    for judge in _judges(analog):
        if judge in paired and judge in claim:
            c = claim[judge]
            parts.append(f"{judge} {_pct(c['aligned'])} → {_pct(c[other])}: {_reading(paired[judge])}")
    return f"- **{LABELS.get(key, key)}** (paper: ≥ {_pct(PAPER_EFFECT[key.split('_')[0]])} cut). " + "; ".join(parts)


def _noise_summary(analog: dict) -> str:
    """One computed sentence: which interventions stay within noise of their aligned model under every judge that
    has enough events, and which move under some judge."""
    still, moved = [], []
    for key, claim in analog["claims"].items():
        if "paired" not in claim:
            continue
        judged = {
            j: p
            for j, p in claim["paired"].items()
            if p.get("reduction_ci") and p.get("events_reference") is not None and p["events_reference"] >= MIN_EVENTS
        }
        lower = [j for j, p in judged.items() if p["reduction_ci"][0] > 0]
        higher = [j for j, p in judged.items() if p["reduction_ci"][1] < 0]
        few = [j for j in claim["paired"] if j not in judged]
        name = LABELS.get(key, key)
        if not lower and not higher:
            still.append(name + (f" ({', '.join(few)}: too few events)" if few else ""))
        else:
            bits = [f"lower under {', '.join(lower)}"] if lower else []
            bits += [f"higher under {', '.join(higher)}"] if higher else []
            moved.append(f"{name} ({'; '.join(bits)})")
    out = []
    if still:
        out.append("Within noise of the aligned model under every judge with enough events: " + "; ".join(still) + ".")
    if moved:
        out.append("Outside noise under some judge: " + "; ".join(moved) + ".")
    return " ".join(out)


def _system_table(analog: dict, k: str) -> list[str]:
    primary = analog.get("primary_judge", "keyword")
    lines = [
        f"| system | {primary} [95% CI] | keyword [95% CI] | three-way | rows (prompts) | likelihood | perplexity | GSM8K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in analog["systems"].items():
        a = s["asr"].get(k) or {}
        if not a:
            continue
        ci = a.get("ci") or {}
        rows = (a.get("n_rows") or {}).get("keyword")
        prompts = (a.get("clusters") or {}).get("keyword", a.get("n"))
        lik, ppl = s.get("likelihood_mean"), s.get("perplexity")
        lines.append(
            f"| {name} | {_pct(a.get(primary))}{_ci(ci.get(primary))} | {_pct(a.get('keyword'))}{_ci(ci.get('keyword'))}"
            f" | {_pct(a.get('threeway'))} | {rows} ({prompts}) | {'n/a' if lik is None else f'{lik:.2f}'} | "
            f"{'n/a' if ppl is None else f'{ppl:.2f}'} | {'n/a' if s.get('gsm8k') is None else _pct(s['gsm8k'])} |"
        )
    return lines


def _mechanism_bullets(analog: dict) -> list[str]:
    claims, out = analog["claims"], []
    for key in ("kl_decays_with_position", "harmful_more_base_favored_than_benign"):
        m = claims.get(key)
        if m and "contexts" in m:
            out.append(f"- **{m['paper']}**: {m['verdict_text']}. {mechanism_cells(m, key)}.")
    tf = "harmful_response/teacher_forced"
    al, st = analog["analysis"]["aligned_vs_base"].get(tf, {}), analog["analysis"]["student_vs_base"].get(tf, {})
    if al.get("kl_late") is not None and st.get("kl_late") is not None:
        direction = "higher" if st["kl_late"] > al["kl_late"] else "not higher"
        out.append(
            f"- **The student's KL to the base** teacher-forced along harmful responses, late (positions 15+): "
            f"{st['kl_late']:.2f} nats vs the aligned model's {al['kl_late']:.2f} ({direction}; the paper's Fig. 3 "
            f"has it higher); early {st['kl_early']:.2f} vs {al['kl_early']:.2f}. Means over 16 prompts or fewer, "
            "no interval stored."
        )
    pull = analog.get("completion_pull")
    if pull:
        ratios = ", ".join(
            f"{name} {s['mass_ratio']:.2g}×" for name, s in pull["students"].items() if s.get("mass_ratio")
        )
        out.append(
            f"- **Which way Eq. 9's L2 term pulls.** At the student's start {_pct(pull['aligned']['share_negative'])} "
            f"of the base-favored ids M have negative logits ({_pct(pull['aligned']['share_below_mean'])} below their "
            "row's mean), so pulling them towards 0 raises most of them. Probability mass on M relative to the "
            f"aligned model: {ratios} (`bft.analysis.completion_pull`, docs/loss.md)."
        )
    return out


def _versus_bullet(analog: dict) -> list[str]:
    vs = analog["claims"].get("bft_vs_qi")
    if not vs:
        return []
    parts = []
    for judge in _judges(analog):
        e = vs.get(judge)
        if not isinstance(e, dict):
            continue
        t = e.get("sign_test") or {}
        p = f"p = {t['p_value']:.2g}" if "p_value" in t else f"p ≤ {t.get('p_value_bound', 1):.2g} (bound)"
        parts.append(
            f"{judge} Qi {_pct(e['qi'])} vs student {_pct(e['student'])}, sign test over prompts {p}: {e['verdict']}"
        )
    return ["- **BFT against Qi at the same prompts** (paper: level). " + "; ".join(parts) + "."]


def _utility_bullet(analog: dict) -> list[str]:
    u = analog["claims"].get("bft_keeps_utility")
    if not u:
        return []
    ppl, gsm = u["perplexity"], u["gsm8k"]
    rel = ppl.get("relative_change")
    text = (
        f"- **Utility** (paper: drops by ≤ 2 points): benign perplexity {ppl['aligned']:.2f} → {ppl['student']:.2f}"
        f" ({'n/a' if rel is None else f'{100 * rel:+.0f}%'}) for the student"
    )
    qi = analog["systems"].get("qi augmentation")
    if qi and qi.get("perplexity") is not None:
        text += f", {qi['perplexity']:.2f} for Qi's augmentation"
    if gsm.get("floor"):
        text += "; GSM8K 0% for both (the model solves none: no verdict)"
    elif gsm.get("aligned") is not None and gsm.get("student") is not None:
        text += f"; GSM8K {_pct(gsm['aligned'])} → {_pct(gsm['student'])}"
    return [text + "."]


def _judge_note(analog: dict, k: str) -> list[str]:
    base = (analog["systems"].get("base") or {}).get("asr", {}).get(k) or {}
    primary = analog.get("primary_judge", "keyword")
    if primary == "keyword" or base.get(primary) is None or base.get("keyword") is None:
        return []
    return [
        f"- **What the {primary} judge sees.** The base model after a {k}-token prefill is judged harmful "
        f"{_pct(base[primary])} of the time, while {_pct(base['keyword'])} of its continuations are not refusals: "
        "most of what the keyword judge counts neither refuses nor helps."
    ]


def _under_run_heading(lines: list[str]) -> list[str]:
    """A report's markdown placed one level below the run's heading (``### title``): its ``## `` and ``### ``
    headings become ``#### `` and ``##### ``."""
    return [("##" + line) if line.startswith(("## ", "### ")) else line for line in lines]


def frontier_section(summary: dict, folder: str) -> list[str]:
    """The ASR-against-utility curves of a run (its summary's ``frontier`` key: the points per method and checkpoint,
    which of them no other method's point dominates, with intervals; :func:`bft.pipelines.reproduce.frontier.render_frontier`),
    nothing when the run has none. ``folder`` is the run's folder, for the links to its plots."""
    text = render_frontier(summary["frontier"], folder) if "frontier" in summary else ""
    demoted = _under_run_heading(text.splitlines())
    return [*demoted, ""] if demoted else []


def _run_section(root: Path, folder: str, title: str, command: str, notes: str) -> list[str]:
    summary = json.loads((root / folder / "summary.json").read_text())
    cfg, data, env = summary["config"], summary["data"], summary.get("environment") or {}
    k = str(cfg.get("sweep_k", 4))
    seeds = cfg.get("eval_seeds", 1)
    budget = f"{cfg['bft_epochs']:g} epochs" if cfg.get("bft_epochs") else f"{cfg['bft_steps']} steps"
    sampling = (
        f"{seeds} sampling seed{'s' if seeds != 1 else ''} at k = {k}"
        if summary["analogs"]
        else "sampling seeds as the frontier table says"  # a frontier-only run: its sizes are the frontier's
    )
    lines = [
        f"### {title}",
        "",
        f"`{command}` (report: [{folder}/REPORT.md]({folder}/REPORT.md), numbers: [{folder}/summary.json]"
        f"({folder}/summary.json)). {env.get('device', 'n/a')}, torch {env.get('torch', 'n/a')}, seed "
        f"{cfg['seed']}; the stages took {env.get('stages_min', 'n/a')} min. Test split: {data['harmful_test']} prompts "
        f"({', '.join(f'{s} {n}' for s, n in data['test_sources'].items())}), {sampling} "
        f"(temperature {cfg['temperature']:g}, top-p {cfg['top_p']:g}), "
        f"{cfg['eval_tokens']} new tokens; students trained for {budget}. {notes}",
        "",
    ]
    cal = calibration_table(summary)
    if cal:
        lines += _under_run_heading(cal)
    sweep = sweep_table(summary)
    if sweep:
        lines += _under_run_heading(sweep)
    for name, analog in summary["analogs"].items():
        share = analog.get("recovery_share") or 0
        lines += [
            f"**{name}** analog ({'plain refusal SFT' if not share else f'{100 * share:g}% recovery examples'}), "
            f"k = {k}; intervals take the prompt as the unit:",
            "",
            *_system_table(analog, k),
            "",
        ]
        bullets = [
            _reduction_bullet(key, claim, analog) for key, claim in analog["claims"].items() if "paired" in claim
        ]
        bullets += [f"- {_noise_summary(analog)}"]
        bullets += _versus_bullet(analog) + _mechanism_bullets(analog) + _utility_bullet(analog)
        bullets += _judge_note(analog, k)
        lines += bullets + [""]
        plot = f"{folder}/plots/kl_by_position_{name}.png"
        if (root / plot).is_file():
            lines += [f"![KL by position, {name} analog]({plot})", ""]
    lines += frontier_section(summary, folder)
    return lines


def _at_a_glance(root: Path) -> list[str]:
    """Every run and analog against every claim: the verdict per judge (harm · keyword · three-way), the mechanism
    claims' reading per context."""
    cols, rows = [], {}
    for folder, _title, _, _ in RUNS:
        path = root / folder / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        for name, analog in summary["analogs"].items():
            cols.append(f"{folder.removeprefix('docs/results').strip('/') or 'default'}: {name}")
            for key, claim in analog["claims"].items():
                if "verdict_text" in claim:
                    cell = claim["verdict_text"].replace(" (direction of the means; no intervals stored)", "")
                elif isinstance(claim.get("verdict"), dict):
                    cell = " · ".join(claim["verdict"].get(j, "n/a") for j in _judges(analog))
                else:
                    continue
                label = LABELS.get(key, claim.get("paper", key))
                rows.setdefault(label, {})[cols[-1]] = cell.replace(
                    "reproduced (a smaller reduction than the paper's)", "smaller"
                )
    if not cols:
        return []
    lines = [
        "**At a glance** (runs below; a cut's verdict under harm · keyword · three-way, *smaller*: reproduced, a "
        "smaller reduction than the paper's; mechanism claims per context, directions of the stored means):",
        "",
        "| claim | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(cells.get(c, "—") for c in cols) + " |")
    return lines + [""]


#: the diagnostic's measures, in the order its line reads them
MEASURES = (("asr", "ASR"), ("perplexity", "perplexity"), ("overrefusal", "over-refusal"))


def _against_own(diag: dict, own: dict | None, measure: str, judge: str, k) -> str:
    """Whether the diagnostic's ``measure`` is lower or higher than the own-teacher student's beyond the 95%
    intervals, as the frontier's dominance reads an axis (:func:`separated_below`: perplexity paired over the
    shared benign prompts, ASR and over-refusal by disjoint intervals)."""
    if not own:
        return "not comparable (no student of its own teacher with that seed)"
    d, o = point_axis(diag, measure, judge, k), point_axis(own, measure, judge, k)
    if not (d[2] and o[2]) and not (d[1] and o[1]):
        return "not comparable (an interval is missing)"
    if separated_below(d, o):
        return "lower beyond the intervals"
    return "higher beyond the intervals" if separated_below(o, d) else "within the intervals"


def _own_teacher_by_seed(res: dict, diag: dict) -> dict:
    """Each training seed's full-budget point of the student of its own teacher (the diagnostic's loss)."""
    return (res.get("headline_by_training_seed") or {}).get(diag.get("loss")) or {}


def _own_teacher_point(res: dict, diag: dict) -> dict | None:
    """The student of its own teacher that the diagnostic is read against: the full-budget point of the same loss
    pooling the same training seeds (a summary from before pooled diagnostics: that seed's headline)."""
    seeds = diag.get("training_seeds") or []
    for p in res.get("points", []):
        if p["method"] == diag.get("loss") and p.get("fraction") == 1.0 and p.get("training_seeds") == seeds:
            return p
    return _own_teacher_by_seed(res, diag).get(str(seeds[0])) if len(seeds) == 1 else None


def _seed_words(seeds: list) -> str:
    if len(seeds) == 1:
        return f"training seed {seeds[0]}"
    return f"training seeds {', '.join(map(str, seeds[:-1]))} and {seeds[-1]}, pooled by prompt"


def _diagnostic_lines(analog: str, res: dict, fr: dict) -> list[str]:
    """Where the frontier's diagnostic lands (:func:`bft.pipelines.reproduce.frontier._diagnostic`): the student
    analog's student distilled from the teacher analog's aligned model, beside the student of its own aligned model
    from the same training seeds (:func:`_own_teacher_point`) and the aligned model it starts from, each measure
    read against the own-teacher student by :func:`_against_own`; with several seeds, each seed's ASR too."""
    judge, k = fr.get("primary_judge", "harm"), (fr.get("ks") or [4])[0]
    aligned = next((p for p in res.get("points", []) if p["method"] == "aligned"), None)
    lines = []
    for diag in (p for p in res.get("points", []) if p["method"] == "diagnostic"):
        seeds = diag.get("training_seeds") or []
        own = _own_teacher_point(res, diag)
        teacher = diag.get("teacher")
        rows = [(f"{teacher} teacher", diag), (f"{analog} teacher (its own)", own), ("the aligned model", aligned)]

        def cells(measure, pct, rows=rows):
            axes = [(name, point_axis(point, measure, judge, k)) for name, point in rows if point]
            return "; ".join(f"{name} {format_measure(v, ci, pct)}" for name, (v, ci, _) in axes if v is not None)

        readings = ", ".join(f"{name} {_against_own(diag, own, measure, judge, k)}" for measure, name in MEASURES)

        def seed_asr(by_seed, seeds=seeds):
            points = [by_seed[str(s)] for s in seeds if str(s) in by_seed]
            return " / ".join(format_measure(point_axis(p, "asr", judge, k)[0], None) for p in points)

        per_seed = ""
        if len(seeds) > 1:
            per_seed = (
                f" Per training seed, ASR: {teacher} teacher {seed_asr(diag.get('by_training_seed') or {})}; "
                f"{analog} teacher {seed_asr(_own_teacher_by_seed(res, diag))} (seeds {' / '.join(map(str, seeds))})."
            )
        lines.append(
            f"- {analog} analog, the diagnostic (what bounds BFT's gain): the {analog} analog's student distilled "
            f"from the {teacher} analog's aligned model instead of its own ({_seed_words(seeds)}, "
            f"{diag.get('loss')}, the full budget). ASR ({judge} judge, k = {k}): {cells('asr', True)}. Benign "
            f"perplexity: {cells('perplexity', False)}. Over-refusal: {cells('overrefusal', True)}. With the "
            f"{teacher} teacher against its own: {readings}.{per_seed}"
        )
    return lines


def _frontier_headline(root: Path) -> list[str]:
    """The headline question of every committed frontier, first in the section: does any BFT point reach a place on
    the ASR-utility plane that Qi's curve does not dominate? The stored ``beyond_qi`` verdict per analog and utility
    measure (:func:`bft.pipelines.reproduce.frontier.beyond_qi`)."""
    lines = []
    verdicts = []  # (analog, utility, verdict) of every analog with a Qi curve: the answer line
    for folder, _title, _, _ in RUNS:
        path = root / folder / "summary.json"
        fr = (json.loads(path.read_text()).get("frontier") if path.is_file() else None) or {}
        for analog, res in (fr.get("analogs") or {}).items():
            lines += _diagnostic_lines(analog, res, fr)
            if not any(b.get("qi_points") for b in (res.get("beyond_qi") or {}).values()):
                continue  # no Qi curve in this run (the diagnostic's run): the headline question does not apply
            verdicts += [(analog, u, b.get("verdict", "no verdict stored")) for u, b in res["beyond_qi"].items()]
            aligned = next((p for p in res.get("points", []) if p["method"] == "aligned"), {})
            refused = aligned.get("overrefusal")
            if refused and refused.get("n"):
                ci = refused.get("ci") or [None, None]
                lines.append(
                    f"- {analog} analog: the aligned model refuses {round(refused['value'] * refused['n'])} of "
                    f"{refused['n']} benign look-alike prompts ({_pct(refused['value'])}, 95% "
                    f"[{_pct(ci[0])}, {_pct(ci[1])}])"
                    + (
                        ": a blanket refuser, so over-refusal ranks only how much of that a method unlearns."
                        if refused["value"] >= 0.9
                        else "."
                    )
                )
            for utility, b in (res.get("beyond_qi") or {}).items():
                escaped = ", ".join(b["point"]) or "none"
                lines.append(
                    f"- {analog} analog, ASR ({b['judge']} judge, k = {b['k']}) against "
                    f"{UTILITY_NAMES.get(utility, utility)}: "
                    f"**{b.get('verdict', 'no verdict stored')}**. BFT points Qi's curve does not dominate: "
                    f"{escaped} (point estimates; {len(b['separated'])} of {b['bft_points']} with intervals "
                    f"required)"
                    + (
                        f"; of those, safer than the aligned model: {', '.join(b['escaping']) or 'none'}"
                        if b["point"] and "escaping" in b
                        else ""
                    )
                    + f"; training seeds at the full budget: {b.get('training_seeds', 'n/a')}."
                )
        curve_seeds = (fr.get("sizes") or {}).get("curve_training_seeds")
        along = [p for res in (fr.get("analogs") or {}).values() for p in res.get("points", [])]
        has_curves = any(0 < p.get("fraction", 1.0) < 1 for p in along)  # the diagnostic's run: full budget only
        if has_curves and curve_seeds is not None and len(curve_seeds) < len(fr.get("seeds", [])):
            lines.append(
                f"- The checkpoints along the curves are training seed{'s' if len(curve_seeds) != 1 else ''} "
                f"{', '.join(map(str, curve_seeds))} only (the full-budget points pool {len(fr['seeds'])}): their "
                "intervals cover prompts, not training runs, and the verdicts weigh BFT's points against all of them."
            )
    if not lines:
        return []
    return [
        "**Is BFT on the frontier?** Whether any BFT checkpoint safer than the aligned model reaches a point that "
        "Qi et al.'s augmentation, trained for the same budget, does not dominate (lower ASR and better utility; "
        "over-refusal alone rewards a checkpoint whose answers have come apart, so the joint line asks for both "
        "utilities at once; details under the frontier run below):",
        "",
        *([_frontier_answer(verdicts), ""] if verdicts else []),
        *lines,
        "",
    ]


#: What each stored ``beyond_qi`` verdict (:func:`bft.pipelines.reproduce.frontier.beyond_qi`) says in the answer.
ANSWER_READINGS = {
    "dominated": "Qi's curve dominates every BFT checkpoint safer than the aligned model, beyond the intervals",
    "dominated by point estimates only: inconclusive within the intervals": (
        "Qi's curve dominates the safer BFT checkpoints by the point estimates only, inconclusive"
    ),
    "not dominated by the point estimates only: inconclusive within the intervals": (
        "some safer BFT checkpoints escape Qi's curve by the point estimates only, inconclusive"
    ),
    "not dominated, beyond the intervals": "a safer BFT checkpoint escapes Qi's curve beyond the intervals",
    "no BFT point is safer than the aligned model": "no BFT checkpoint is safer than the aligned model",
}


def _frontier_answer(verdicts: list[tuple[str, str, str]]) -> str:
    """The headline question answered in one paragraph from the stored verdicts ``(analog, utility, verdict)``: a
    lead (yes where a BFT checkpoint escapes Qi's curve beyond the intervals; no only where every question has a
    verdict), then per utility measure each reading with the analogs it holds for."""
    escaped = list(dict.fromkeys(a for a, _, v in verdicts if v == "not dominated, beyond the intervals"))
    if escaped:
        lead = (
            "yes: a BFT checkpoint safer than the aligned model escapes Qi's curve beyond the intervals "
            f"({_analogs(escaped)})"
        )
    elif all(v in ANSWER_READINGS for _, _, v in verdicts):
        lead = "no BFT checkpoint safer than the aligned model escapes Qi's curve beyond the intervals"
    else:
        lead = (
            "no verdict on every question; where there is one, no BFT checkpoint safer than the aligned model "
            "escapes Qi's curve beyond the intervals"
        )
    by_utility: dict = {}  # utility -> reading -> analogs
    for analog, utility, verdict in verdicts:
        by_utility.setdefault(utility, {}).setdefault(ANSWER_READINGS.get(verdict, verdict), []).append(analog)
    sentences = [
        f"Against {UTILITY_NAMES.get(u, u)}: "
        + "; ".join(f"{reading} ({_analogs(analogs)})" for reading, analogs in readings.items())
        + "."
        for u, readings in by_utility.items()
    ]
    return " ".join([f"**In short: {lead}.**", *sentences])


def _analogs(names: list[str]) -> str:
    return f"{' and '.join(names)} analog{'s' if len(names) > 1 else ''}"


def render_results(root: Path | str = ".") -> str:
    """The Results section's body (between the markers), from the summaries under ``root``."""
    root = Path(root)
    n_runs = sum((root / folder / "summary.json").is_file() for folder, *_ in RUNS)
    lines = [
        "<!-- generated by `bft reproduce --render-readme` (bft/pipelines/reproduce/readme.py) from the "
        "summaries below; edit the template, not this text -->",
        "",
        f"{_WORDS.get(n_runs, str(n_runs))} CPU run{'s' if n_runs != 1 else ''} of `bft reproduce` on SmolLM2-135M-Instruct (a 2-core AMD EPYC, no GPU). The harm judge "
        "(calibrated to human labels) is primary; keyword (any non-refusal) and three-way (on-topic compliance) "
        "are beside it; likelihood is the mean log-prob of the base model's harmful response (lower is safer); "
        "perplexity is on benign reference solutions. These are findings at 135M parameters with a CPU budget, not "
        "a verdict on the method at 7-8B.",
        "",
        "How the verdicts are read (`bft.eval.stats`, `bft.pipelines.reproduce.summary`): a cut is *reproduced* "
        "when the 95% interval of the relative reduction (bootstrap over prompts) excludes zero, *not reproduced* "
        "when it excludes the paper's effect size, *inconclusive* otherwise, and *inconclusive* whatever the "
        f"interval when fewer than {MIN_EVENTS} attack successes on the aligned side back it. Sampling seeds of a "
        "prompt are not independent: ASR intervals and paired tests take the prompt as the unit (a summary "
        "re-judged from its stored fields shows the sign-test p-value as the bound its row counts allow). "
        "Mechanism claims are read in every context where they are measured.",
        "",
    ]
    lines += _frontier_headline(root) + _at_a_glance(root)
    for folder, title, command, notes in RUNS:
        if (root / folder / "summary.json").is_file():
            lines += _run_section(root, folder, title, command, notes)
    lines += [
        "`make demo` runs the `--quick` size (one analog, 12 test prompts, k ∈ {0, 4}) and prints the same kind of report."
    ]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(readme: str, body: str) -> str:
    """``readme`` with the text between :data:`BEGIN` and :data:`END` replaced by ``body``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README needs exactly one {BEGIN} before one {END}")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def committed_section(readme: str) -> str:
    """The text between the markers of ``readme``."""
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render README.md's Results section from docs/results summaries")
    parser.add_argument("--root", default=".", help="repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's section is out of date")
    args = parser.parse_args(argv)
    path = Path(args.root) / "README.md"
    try:
        readme = path.read_text()
        new = replace_section(readme, render_results(args.root))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"render-readme: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != readme:
            print("render-readme: README.md's Results section differs from the summaries", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
