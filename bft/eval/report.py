"""Markdown report and PNG plots from a results dict (see :mod:`bft.eval.runner`); no model needed."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from bft.atomic import atomic_save_figure

__all__ = ["render_markdown", "write_plots"]


def fmt_pct(value) -> str:
    """A share in [0, 1] as a percentage with one decimal ("n/a" for None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}"


_pct = fmt_pct


def _ks(summary_systems: dict) -> list[str]:
    ks: list[str] = []
    for s in summary_systems.values():
        for k in s.get("prefill", {}):
            if k not in ks:
                ks.append(k)
    return sorted(ks, key=lambda k: (k == "full", int(k) if k.isdigit() else 0))


def _k_label(k: str) -> str:
    return "no prefill" if k == "0" else ("full target" if k == "full" else f"k={k}")


def _alpha_of(results: dict, name: str):
    return results["systems"].get(name, {}).get("alpha")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _utility_cells(s: dict) -> tuple[str, str]:
    u = s.get("utility", {})
    ppl = u.get("perplexity", {}).get("perplexity")
    gsm = u.get("gsm8k", {}).get("accuracy")
    return ("n/a" if ppl is None else f"{ppl:.2f}"), _pct(gsm)


def render_markdown(results: dict) -> str:
    summary = results["summary"]
    systems = summary["systems"]
    primary = summary["primary_judge"]
    cfg = results["config"]
    gen = cfg.get("generation", {})
    ks = _ks(systems)
    out = ["# bft eval report", ""]
    decoding = (
        f"sampling (temperature {gen.get('temperature')}, top_p {gen.get('top_p')}, seed {gen.get('seed')})"
        if gen.get("do_sample")
        else "greedy"
    )
    out.append(
        f"Dataset `{cfg['dataset']}` ({_n_prompts(results)} prompts), {decoding} decoding, max_new_tokens "
        f"{gen.get('max_new_tokens')}; judged text: {cfg.get('judge_text')}; primary judge: `{primary}`. "
        f"All rates are percentages; ASR = share of responses judged harmful (lower is safer)."
    )
    out.append("")
    for section in (_main_table, _measures_tables, _alpha_sweep_table, _deliberation_table, _finetune_and_lm_eval):
        out += section(results, systems, primary, ks)
    other_notes = [n for n in results.get("notes", []) if "three-way" not in n]
    if other_notes:
        out += ["## Notes", ""] + [f"- {n}" for n in other_notes] + [""]
    out.append("Every generation and judgement is in `results.json`; re-judge with `bft eval --rejudge DIR`.")
    return "\n".join(out) + "\n"


def _main_table(results: dict, systems: dict, primary: str, ks: list[str]) -> list[str]:
    """The paper-shaped table: ASR per attack and utility per system (Tables 1-3)."""
    out: list[str] = []
    out += ["## Attack success and utility (paper Tables 1-3 layout)", ""]
    header = ["System"] + [f"Prefill {_k_label(k)}" for k in ks] + ["GCG", "HRR", "PPL ↓", "GSM8K EM"]
    rows = []
    for name, s in systems.items():
        row = [name] + [_pct(s.get("prefill", {}).get(k, {}).get(primary)) for k in ks]
        row += [_pct(s.get("gcg", {}).get(primary)), _pct(s.get("finetune", {}).get(primary))]
        row += list(_utility_cells(s))
        rows.append(row)
    out += [_table(header, rows), ""]
    out.append(
        f"Prefill/GCG/HRR columns use the `{primary}` judge. HRR = harmful rate on the plain harmful requests "
        "after the LoRA fine-tuning attack (lower is better; see docs/eval.md)."
    )
    out.append("")
    return out


def _measures_tables(results: dict, systems: dict, primary: str, ks: list[str]) -> list[str]:
    """Every offline measure side by side per system and attack, and the likelihood table."""
    out: list[str] = []
    out += ["## Three measures side by side", ""]
    out.append(
        "keyword = not a refusal phrase (the literature's ASR); on-topic = three-way judge: non-refusal that is "
        "semantically close to the request or its reference (refusal / off-topic shares beside it); "
        "log-prob = judge-free likelihood of the reference harmful continuation (mean per token, lower is safer)."
    )
    if "harm" in results.get("judges", []):
        out.append(
            "harm = the offline harm judge: the answer substantively helps with the request, by a classifier "
            "calibrated to human labels (the primary offline measure; docs/offline-measures.md)."
        )
    out.append("")
    model_judges = [j for j in results.get("judges", []) if j not in ("keyword", "threeway")]
    header = ["System", "Attack", "keyword ASR", "on-topic ASR", "refusal", "off-topic"] + [
        f"{j} ASR" for j in model_judges
    ]
    rows = []
    for name, s in systems.items():
        groups = [(_k_label(k), s["prefill"][k]) for k in ks if k in s.get("prefill", {})]
        groups += [(label, s[key]) for key, label in (("gcg", "GCG"), ("finetune", "fine-tune (HRR)")) if key in s]
        for label, rates in groups:
            tw = rates.get("threeway")
            row = [name, label, _pct(rates.get("keyword"))]
            row += [_pct(tw["on_topic"]), _pct(tw["refusal"]), _pct(tw["off_topic"])] if tw else ["n/a"] * 3
            row += [_pct(rates.get(j)) for j in model_judges]
            rows.append(row)
    out += [_table(header, rows), ""]
    lk_rows = []
    for name, s in systems.items():
        lk = s.get("likelihood")
        if not lk:
            continue
        if "unavailable" in lk:
            lk_rows.append([name, "n/a", "n/a", lk["unavailable"]])
            continue
        first = ", ".join(f"{v:.2f}" for v in lk["by_position"][:5])
        lk_rows.append([name, f"{lk['mean']:.3f}", first, f"{lk['reference']} reference, n={lk['n']}"])
    if lk_rows:
        out += [_table(["System", "mean log-prob ↓", "positions 1-5", "notes"], lk_rows), ""]
    for note in results.get("notes", []):
        if "three-way" in note:
            out += [f"> {note}", ""]
    return out


def _alpha_sweep_table(results: dict, systems: dict, primary: str, ks: list[str]) -> list[str]:
    """Contrastive decoding at every α evaluated."""
    out: list[str] = []
    sweep = [(name, _alpha_of(results, name)) for name in systems if _alpha_of(results, name) is not None]
    if len(sweep) > 1:
        out += ["## Contrastive decoding: α sweep", ""]
        header = ["α", "Eq. 7 form"] + [f"{_k_label(k)} keyword / on-topic" for k in ks]
        header += ["log-prob ↓", "PPL ↓", "GSM8K EM"]
        rows = []
        form_of = {name: results["systems"].get(name, {}).get("form") or "logprobs" for name, _ in sweep}
        for name, alpha in sorted(sweep, key=lambda t: (form_of[t[0]], t[1])):
            s = systems[name]
            row = [f"{alpha:g}", form_of[name]]
            for k in ks:
                rates = s.get("prefill", {}).get(k, {})
                tw = rates.get("threeway")
                row.append(f"{_pct(rates.get('keyword'))} / {_pct(tw['on_topic']) if tw else 'n/a'}")
            lk = s.get("likelihood", {})
            row.append(f"{lk['mean']:.3f}" if "mean" in lk else "n/a")
            row += list(_utility_cells(s))
            rows.append(row)
        out += [_table(header, rows), ""]
    return out


def _deliberation_table(results: dict, systems: dict, primary: str, ks: list[str]) -> list[str]:
    """Deliberation under the prefill attack (Table 5)."""
    out: list[str] = []
    delib = [(name, s["deliberation"]) for name, s in systems.items() if "deliberation" in s]
    if delib:
        k = _k_label(str(delib[0][1]["k"]))
        out += [f"## Deliberation under the prefill attack ({k}; paper Table 5)", ""]
        header = ["Response category"] + [name for name, _ in delib]
        cats = [
            ("harmful+reasoning", "Harmful + Reasoning"),
            ("harmful+no_reasoning", "Harmful + No Reasoning"),
            ("total_harmful", "Total Harmful"),
            ("safe+reasoning", "Safe + Reasoning"),
            ("safe+no_reasoning", "Safe + No Reasoning"),
            ("total_safe", "Total Safe"),
            ("total_reasoning", "Total with Reasoning"),
        ]
        rows = []
        for key, label in cats:
            cells = []
            for _, d in delib:
                cell = str(d[key])
                if key in ("total_harmful", "total_safe", "total_reasoning") and d["n"]:
                    cell += f" ({100 * d[key] / d['n']:.1f}%)"
                cells.append(cell)
            rows.append([label] + cells)
        out += [_table(header, rows), ""]
        out.append("Safety outcome from the primary judge; reasoning = keyword rule of bft.eval.deliberation.")
        out.append("")
    return out


def _finetune_and_lm_eval(results: dict, systems: dict, primary: str, ks: list[str]) -> list[str]:
    """Fine-tuning attack settings and lm-eval-harness scores."""
    out: list[str] = []
    ft = [(n, results.get("measures", {}).get(n, {}).get("finetune_attack")) for n in systems]
    ft = [(n, f) for n, f in ft if f]
    if ft:
        out += ["## Fine-tuning attack", ""]
        rows = [
            [
                n,
                str(f.get("dataset")),
                str(f.get("n_train")),
                f"{f.get('rank')}",
                f"{f.get('lr')}",
                f"{f.get('epochs')}",
                f"{f.get('final_loss', float('nan')):.3f}",
                str(f.get("saved_to", "")),
            ]
            for n, f in ft
        ]
        out += [_table(["System", "data", "examples", "rank", "lr", "epochs", "final loss", "saved to"], rows), ""]
    lm = [(n, s.get("utility", {}).get("lm_eval")) for n, s in systems.items()]
    lm = [(n, r) for n, r in lm if r]
    if lm:
        out += ["## lm-eval-harness", ""]
        for n, r in lm:
            if "unavailable" in r:
                out.append(f"- {n}: skipped — {r['unavailable']}")
            else:
                for task, metrics in r.items():
                    vals = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items())
                    out.append(f"- {n} / {task}: {vals}")
        out.append("")
    return out


def _n_prompts(results: dict) -> int:
    prompts = set()
    for attacks in results["records"].values():
        for r in attacks.get("prefill", []) or []:
            prompts.add(r["prompt"])
    return len(prompts)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "system"


def _savefig(fig, path: Path) -> None:
    atomic_save_figure(fig, path, dpi=120)


def write_plots(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``asr_vs_k.png`` (ASR vs prefill length, one panel per measure), ``alpha_sweep.png`` (ASR vs α) and
    ``likelihood_by_position.png``, when the data for them exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = results["summary"]
    systems = summary["systems"]
    ks = _ks(systems)
    paths: dict[str, Path] = {}
    measures = [("keyword", "keyword ASR (%)")]
    if any("threeway" in r for s in systems.values() for r in s.get("prefill", {}).values()):
        measures.append(("threeway", "on-topic ASR (%)"))
    primary = summary["primary_judge"]
    if primary != "keyword":
        measures.append((primary, f"{primary} ASR (%)"))

    def value(rates: dict, measure: str):
        if measure == "threeway":
            tw = rates.get("threeway")
            return None if tw is None else 100 * tw["on_topic"]
        v = rates.get(measure)
        return None if v is None else 100 * v

    if ks:
        fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 3.6), squeeze=False)
        for ax, (measure, label) in zip(axes[0], measures):
            for name, s in systems.items():
                ys = [value(s.get("prefill", {}).get(k, {}), measure) for k in ks]
                xs = [i for i, y in enumerate(ys) if y is not None]
                if xs:
                    ax.plot(xs, [ys[i] for i in xs], marker="o", label=name)
            ax.set_xticks(range(len(ks)), [_k_label(k).replace("k=", "") for k in ks])
            ax.set_xlabel("prefilled response tokens")
            ax.set_ylabel(label)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Prefill attack: ASR vs prefix length")
        paths["asr_vs_k"] = out / "asr_vs_k.png"
        _savefig(fig, paths["asr_vs_k"])
        plt.close(fig)

    sweep = sorted(
        (
            (results["systems"][n].get("alpha"), n)
            for n in systems
            if results["systems"].get(n, {}).get("alpha") is not None
        ),
        key=lambda t: t[0],
    )
    if len(sweep) > 1 and ks:
        fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 3.6), squeeze=False)
        alphas = [a for a, _ in sweep]
        for ax, (measure, label) in zip(axes[0], measures):
            for k in ks:
                ys = [value(systems[n].get("prefill", {}).get(k, {}), measure) for _, n in sweep]
                pts = [(a, y) for a, y in zip(alphas, ys) if y is not None]
                if pts:
                    ax.plot([a for a, _ in pts], [y for _, y in pts], marker="o", label=_k_label(k))
            if all(a > 0 for a in alphas):
                ax.set_xscale("log")
            ax.set_xlabel("α (contrastive penalty)")
            ax.set_ylabel(label)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Contrastive decoding: ASR vs α")
        paths["alpha_sweep"] = out / "alpha_sweep.png"
        _savefig(fig, paths["alpha_sweep"])
        plt.close(fig)

    lk = [(n, s["likelihood"]) for n, s in systems.items() if "by_position" in s.get("likelihood", {})]
    if lk:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, d in lk:
            ax.plot(range(1, len(d["by_position"]) + 1), d["by_position"], label=name)
        ax.set_xlabel("position in reference continuation")
        ax.set_ylabel("mean log-prob (lower = safer)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths["likelihood"] = out / "likelihood_by_position.png"
        _savefig(fig, paths["likelihood"])
        plt.close(fig)
    return paths
