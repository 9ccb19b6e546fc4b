"""bft.pipelines.reproduce.summary.apply_rules on a stored summary, the mechanism claims per context, and README's
Results section rendered from the committed summaries (bft.pipelines.reproduce.readme)."""

import copy
import json
from pathlib import Path

import pytest

from bft.pipelines.reproduce.readme import BEGIN, END, committed_section, render_results, replace_section
from bft.pipelines.reproduce.summary import _mechanism_claims, apply_rules, mechanism_verdict, verdict_changes

ROOT = Path(__file__).resolve().parents[2]


def _paired(events: int, rows: int, prompts: int, ci, n10: int, n01: int, effect: float, old_verdict: str) -> dict:
    return {
        "asr_a": events / rows,
        "asr_b": 0.0,
        "n": rows,
        "clusters": prompts,
        "reduction": 1.0,
        "reduction_ci": ci,
        "mcnemar": {"n10": n10, "n01": n01, "discordant": n10 + n01, "p_value": 0.01},
        "verdict": old_verdict,
        "paper_effect": effect,
    }


def _stored_summary(harm_events: int) -> dict:
    """An older summary (row-level Wilson ``ci``, ``mcnemar``, mechanism claims with one ``holds``)."""
    asr = {
        "harm": harm_events / 600,
        "keyword": 0.6,
        "n": 200,
        "n_rows": {"harm": 600, "keyword": 600},
        "ci": {"harm": [0.004, 0.02], "keyword": [0.56, 0.64]},
    }
    table = {
        "harmful_response/teacher_forced": {
            "kl_early": 2.2,
            "kl_late": 0.5,
            "bf_count_top_early": 70.1,
            "bf_count_top_late": 62.3,
        },
        "benign_response/teacher_forced": {
            "kl_early": 0.9,
            "kl_late": 0.6,
            "bf_count_top_early": 81.4,
            "bf_count_top_late": 71.8,
        },
        "harmful/normal": {"kl_early": 3.0, "kl_late": 3.8, "bf_count_top_early": 92.0, "bf_count_top_late": 94.8},
        "benign/normal": {"kl_early": 0.7, "kl_late": 0.4, "bf_count_top_early": 86.9, "bf_count_top_late": 73.5},
    }
    claims = {
        "kl_decays_with_position": {"paper": "KL decays", "early_mean": 2.2, "late_mean": 0.5, "holds": True},
        "harmful_more_base_favored_than_benign": {"paper": "counts", "harmful": 91.2, "benign": 77.6, "holds": True},
        "qi_cuts_prefill_asr": {
            "paper": "Qi cuts",
            "harm": {"aligned": harm_events / 600, "qi": 0.0, "relative_cut": 1.0},
            "keyword": {"aligned": 0.6, "qi": 0.01, "relative_cut": 0.98},
            "paired": {
                "harm": _paired(harm_events, 600, 200, [1.0, 1.0], harm_events, 0, 0.96, "reproduced"),
                "keyword": _paired(360, 600, 200, [0.96, 1.0], 356, 5, 0.96, "reproduced"),
            },
            "verdict": {"harm": "reproduced", "keyword": "reproduced"},
        },
        "bft_cuts_prefill_asr_50pct": {
            "paper": "BFT cuts",
            "keyword": {"aligned": 0.6, "student": 0.51, "relative_cut": 0.15},
            "paired": {"keyword": _paired(360, 600, 200, [-0.1, 0.3], 80, 60, 0.48, "inconclusive")},
            "verdict": {"keyword": "inconclusive"},
        },
        "bft_vs_qi": {
            "paper": "level",
            "keyword": {
                "qi": 0.0,
                "student": 3 / 600,
                "mcnemar": {"n10": 0, "n01": 3, "discordant": 3, "p_value": 0.25},
                "verdict": "no difference detected",
            },
        },
    }
    analog = {
        "analysis": {"aligned_vs_base": table, "student_vs_base": {}},
        "systems": {"aligned": {"asr": {"4": asr}}},
        "claims": claims,
        "primary_judge": "harm",
    }
    return {"analogs": {"deep": analog}, "primary_judge": "harm"}


def test_apply_rules_needs_ten_events_and_labels_row_level_values():
    stored = _stored_summary(harm_events=9)
    before = copy.deepcopy(stored)
    new = apply_rules(stored)
    assert stored == before  # the input is not modified
    claim = new["analogs"]["deep"]["claims"]["qi_cuts_prefill_asr"]
    assert claim["verdict"] == {"harm": "inconclusive", "keyword": "reproduced"}  # 9 harmful rows cannot back it
    assert claim["paired"]["harm"]["events_reference"] == 9
    p = claim["paired"]["keyword"]
    assert "mcnemar" not in p and p["mcnemar_rows"]["n10"] == 356 and "information only" in p["mcnemar_rows"]["unit"]
    assert p["sign_test"]["unit"].startswith("prompts") and 0 <= p["sign_test"]["p_value_bound"] < 1e-10
    asr = new["analogs"]["deep"]["systems"]["aligned"]["asr"]["4"]
    assert asr["ci_rows"]["keyword"] == [0.56, 0.64]  # the stored row-level interval, kept under its label
    lo, hi = asr["ci"]["keyword"]
    assert lo < 0.56 and hi > 0.64 and asr["clusters"]["keyword"] == 200  # at the prompt count: wider
    # 3 harmful rows on the student's side: no comparison verdict
    assert new["analogs"]["deep"]["claims"]["bft_vs_qi"]["keyword"]["verdict"] == "inconclusive"
    assert new["rules"]["min_events"] == 10
    assert apply_rules(new) == new  # idempotent
    changes = verdict_changes(before, new)
    assert "deep / qi_cuts_prefill_asr / harm: reproduced → inconclusive" in changes
    assert not any("keyword: reproduced → " in line for line in changes)


def test_apply_rules_with_ten_events_keeps_the_verdict():
    new = apply_rules(_stored_summary(harm_events=10))
    assert new["analogs"]["deep"]["claims"]["qi_cuts_prefill_asr"]["verdict"]["harm"] == "reproduced"


def test_apply_rules_rejects_what_is_not_a_summary():
    with pytest.raises(ValueError, match="analogs"):
        apply_rules({"systems": {}})
    with pytest.raises(ValueError, match="claims"):
        apply_rules({"analogs": {"deep": {"systems": {}}}})


def test_mechanism_claim_says_where_the_contexts_disagree():
    new = apply_rules(_stored_summary(harm_events=10))
    claims = new["analogs"]["deep"]["claims"]
    counts = claims["harmful_more_base_favored_than_benign"]
    assert counts["contexts"]["teacher-forced"]["direction"] == "reverses"
    assert counts["contexts"]["along generations"]["direction"] == "holds"
    assert counts["holds"] is None
    assert counts["verdict_text"].startswith("reverses teacher-forced; holds along generations")
    assert "no intervals stored" in counts["verdict_text"]
    kl = claims["kl_decays_with_position"]
    assert kl["verdict_text"].startswith("holds teacher-forced; reverses along generations")
    assert mechanism_verdict({"a": {"direction": "holds"}, "b": {"direction": "holds"}})[0] is True
    assert mechanism_verdict({"a": {"direction": "reverses"}}) == (False, "reverses in every context measured (a)")


def _record(group, mode, kl, count):
    from bft.analysis.positions import METRICS

    metrics = {name: [0.0] * len(kl) for name in METRICS}
    return {"group": group, "mode": mode, "metrics": {**metrics, "kl": kl, "bf_count_top": count}}


def test_mechanism_claims_get_intervals_over_prompts():
    from bft.analysis.positions import summarize

    def m(values):  # 20 positions: the early and late windows
        return [values[0]] * 3 + [values[1]] * 12 + [values[2]] * 5

    records = []
    for i in range(8):  # harmful teacher-forced: KL decays clearly; counts barely above benign (noise)
        records.append(
            _record(
                "harmful_response", "teacher_forced", m([3.0 + 0.1 * i, 1, 0.5]), m([80 + (i % 3), 0, 70 + (i % 2)])
            )
        )
        records.append(
            _record(
                "benign_response", "teacher_forced", m([1.0, 1, 0.8]), m([80 + ((i + 1) % 3), 0, 70 + ((i + 1) % 2)])
            )
        )
        records.append(_record("harmful", "normal", m([2.0, 2, 2.5 + 0.1 * i]), m([90, 0, 90])))
        records.append(_record("benign", "normal", m([1.0, 1, 0.5]), m([80, 0, 75])))
    for r in records:
        r["n_positions"] = 20
    claims = _mechanism_claims({"summary": summarize(records), "records": records}, seed=0)
    kl = claims["kl_decays_with_position"]
    tf = kl["contexts"]["teacher-forced"]
    assert tf["prompts"] == 8 and tf["difference_ci"][0] > 0 and tf["direction"] == "holds"
    assert kl["contexts"]["along generations"]["direction"] == "reverses"
    assert kl["verdict_text"] == "holds teacher-forced; reverses along generations"
    counts = claims["harmful_more_base_favored_than_benign"]
    assert counts["contexts"]["teacher-forced"]["direction"] in ("within noise", "mixed")
    assert counts["contexts"]["along generations"]["direction"] == "holds"
    assert counts["intervals"] == "bootstrap over prompts"
    again = _mechanism_claims({"summary": summarize(records), "records": records}, seed=0)
    assert again == claims  # seeded


def test_readme_results_section_is_what_the_committed_summaries_render():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    assert committed_section(readme) == render_results(ROOT), (
        "README.md's Results section differs from the summaries: run `python -m bft.pipelines.reproduce.readme`"
    )


def test_replace_section_and_its_errors():
    text = f"head\n{BEGIN}\nold\n{END}\ntail\n"
    assert replace_section(text, "new\n") == f"head\n{BEGIN}\nnew\n{END}\ntail\n"
    with pytest.raises(ValueError, match="exactly one"):
        replace_section("no markers", "x")


def test_resummarize_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from bft.cli import console_main

    assert console_main(["reproduce", "--resummarize", "--out", str(tmp_path)]) == 2
    (tmp_path / "summary.json").write_text("{not json")
    assert console_main(["reproduce", "--resummarize", "--out", str(tmp_path)]) == 2
    (tmp_path / "summary.json").write_text(json.dumps({"analogs": []}))
    assert console_main(["reproduce", "--resummarize", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 3 and all(line.startswith("bft reproduce: error:") for line in err[-3:])


def test_a_frontier_only_run_renders_its_headline_first_and_its_table(tmp_path):
    """A run with the frontier alone (no per-analog claims): the Results section opens with its headline verdict,
    and its run section carries the frontier table and no claims table."""
    point = {
        "method": "aligned",
        "label": "aligned",
        "fraction": 0.0,
        "asr": {"4": {"harm": {"asr": 0.5, "ci": [0.4, 0.6], "n": 600}}},
        "perplexity": {"value": 5.4, "ci": [5.2, 5.6]},
        "overrefusal": {"value": 63 / 64, "ci": [0.92, 1.0], "n": 64},
    }
    beyond = {
        "utility": "perplexity",
        "judge": "harm",
        "k": 4,
        "point": [],
        "separated": [],
        "bft_points": 5,
        "qi_points": 5,
        "training_seeds": 1,
        "verdict": "inconclusive: one training seed (a headline needs two)",
    }
    summary = {
        "config": {"seed": 0, "sweep_k": 4, "bft_epochs": 20, "temperature": 0.7, "top_p": 0.9, "eval_tokens": 64},
        "data": {"harmful_test": 200, "test_sources": {"advbench": 120, "harmbench": 80}},
        "analogs": {},
        "frontier": {
            "primary_judge": "harm",
            "ks": [4],
            "seeds": [0],
            "sizes": {},
            "analogs": {"deep": {"points": [point], "dominance": {}, "beyond_qi": {"perplexity": beyond}}},
        },
    }
    folder = tmp_path / "docs" / "results" / "frontier"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    text = render_results(tmp_path)
    assert text.count("One CPU run of") == 1 and "**Is BFT on the frontier?**" in text
    headline = text.index(
        "- deep analog, ASR (harm judge, k = 4) against benign perplexity: **inconclusive: one training"
    )
    assert (
        headline < text.index("### The frontier") < text.index("\n#### Curves, not points") < text.index("\n##### deep")
    )
    assert "| aligned | 0 | – | 50.0% [40.0%, 60.0%] |" in text and "Verdicts at a glance" not in text
    refuses = "- deep analog: the aligned model refuses 63 of 64 benign look-alike prompts (98%, 95% [92%, 100%])"
    assert refuses in text and "a blanket refuser" in text and text.index(refuses) < headline
    point["overrefusal"] = {"value": 0.25, "ci": [0.15, 0.37], "n": 64}
    (folder / "summary.json").write_text(json.dumps(summary))
    text = render_results(tmp_path)
    assert "refuses 16 of 64 benign look-alike prompts (25%, 95% [15%, 37%])." in text
    assert "blanket" not in text


def test_a_diagnostic_run_renders_where_the_diagnostic_lands_and_no_headline_verdict(tmp_path):
    """A frontier run without Qi's curve (the diagnostic's own run): the Results section says where the student of
    the other analog's teacher lands beside the same seed's student of its own teacher, and asks no Qi question."""

    def pt(method, asr, ci, ppl, **extra):
        return {
            "method": method,
            "label": method,
            "fraction": 1.0,
            "asr": {"4": {"harm": {"asr": asr, "ci": ci, "n": 600}}},
            "perplexity": {"value": ppl, "ci": [ppl - 0.1, ppl + 0.1]},
            "overrefusal": {"value": 0.5, "ci": [0.4, 0.6], "n": 64},
            **extra,
        }

    own = pt("bft_eq9", 0.09, [0.07, 0.12], 6.66, training_seeds=[0])
    diag = pt("diagnostic", 0.02, [0.01, 0.04], 6.1, training_seeds=[0], teacher="deep", loss="bft_eq9")
    beyond = {"verdict": "inconclusive: no BFT or no Qi point to compare", "point": [], "separated": []}
    res = {
        "points": [pt("aligned", 0.10, [0.08, 0.14], 5.53), own, diag],
        "headline_by_training_seed": {"bft_eq9": {"0": own}},
        "dominance": {},
        "beyond_qi": {"perplexity": dict(beyond, judge="harm", k=4, bft_points=1, qi_points=0)},
    }
    summary = {
        "config": {
            "seed": 0,
            "sweep_k": 4,
            "bft_epochs": 20,
            "temperature": 0.9,
            "top_p": 0.6,
            "eval_tokens": 64,
            "dedup_threshold": 0.85,
        },
        "data": {"harmful_test": 200, "test_sources": {"advbench": 144, "harmbench": 56}},
        "analogs": {},
        "frontier": {"primary_judge": "harm", "ks": [4], "seeds": [0], "sizes": {}, "analogs": {"shallow": res}},
    }
    folder = tmp_path / "docs" / "results" / "diagnostic"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    text = render_results(tmp_path)
    line = next(x for x in text.splitlines() if x.startswith("- shallow analog, the diagnostic"))
    assert "from the deep analog's aligned model instead of its own (training seed 0, bft_eq9" in line
    assert (
        "deep teacher 2.0% [1.0%, 4.0%]; shallow teacher (its own) 9.0% [7.0%, 12.0%]; the aligned model 10.0%" in line
    )
    assert "deep teacher 6.1 [6, 6.2]" in line
    readings = "With the deep teacher against its own: ASR lower beyond the intervals, perplexity lower beyond the "
    assert readings + "intervals, over-refusal within the intervals." in line
    assert "no Qi point" not in text and "refuses 32 of 64" not in text  # no headline question without Qi's curve
    diag["asr"]["4"]["harm"]["ci"] = [0.05, 0.11]  # overlapping: no reading beyond the intervals
    # perplexity with per-prompt rows is compared paired: 1% lower on every shared benign prompt is separated
    own["perplexity"]["per_prompt"] = {f"b{i}": [-10.0 * (1 + i), 10] for i in range(16)}
    diag["perplexity"]["per_prompt"] = {f"b{i}": [-9.9 * (1 + i), 10] for i in range(16)}
    (folder / "summary.json").write_text(json.dumps(summary))
    text = render_results(tmp_path)
    assert "ASR within the intervals, perplexity lower beyond the intervals" in text
    own["perplexity"]["per_prompt"] = {f"b{i}": [-10.0 * (1 + i) * (0.9 if i % 2 else 1.1), 10] for i in range(16)}
    (folder / "summary.json").write_text(json.dumps(summary))
    assert "ASR within the intervals, perplexity within the intervals" in render_results(tmp_path)
    # two training seeds: read against the own-teacher point pooling the same seeds, each seed's ASR beside it
    pooled_own = pt("bft_eq9", 0.085, [0.07, 0.10], 6.6, training_seeds=[0, 1])
    seed1 = pt("bft_eq9", 0.08, [0.06, 0.11], 6.5, training_seeds=[1])
    diag.update(
        training_seeds=[0, 1],
        asr={"4": {"harm": {"asr": 0.025, "ci": [0.015, 0.04], "n": 1200}}},
        by_training_seed={"0": pt("d", 0.02, None, 6.0), "1": pt("d", 0.03, None, 6.2)},
    )
    res["points"] = [res["points"][0], own, pooled_own, diag]  # own: seed 0 alone, not the comparator now
    res["headline_by_training_seed"]["bft_eq9"]["1"] = seed1
    summary["frontier"].update(seeds=[0, 1], sizes={"curve_training_seeds": [0]})
    (folder / "summary.json").write_text(json.dumps(summary))
    text = render_results(tmp_path)
    assert "checkpoints along the curves" not in text  # every point is at the full budget: there are no curves
    line = next(x for x in text.splitlines() if x.startswith("- shallow analog, the diagnostic"))
    assert "instead of its own (training seeds 0 and 1, pooled by prompt, bft_eq9" in line
    assert "deep teacher 2.5% [1.5%, 4.0%]; shallow teacher (its own) 8.5% [7.0%, 10.0%];" in line
    assert "Per training seed, ASR: deep teacher 2.0% / 3.0%; shallow teacher 9.0% / 8.0% (seeds 0 / 1)." in line
    assert "ASR lower beyond the intervals" in line


@pytest.mark.parametrize(
    "run, expected",
    [
        ("diagnostic", "**shallow**: shallow refusal SFT; **deep**: refusal SFT with 6% safety-recovery"),
        ("summary.json", "**shallow**: shallow refusal SFT; **deep**: refusal SFT with 15% safety-recovery"),
        ("frontier", "**deep**: refusal SFT with 6% safety-recovery"),
    ],
)
def test_the_report_header_names_the_aligned_analogs_of_a_frontier_only_run_too(run, expected):
    """A frontier_only run has no per-analog results: its analogs come from the config ("auto" from the results),
    and it has no Qi peer row to describe (Qi's curve is in the frontier section)."""
    from bft.pipelines.reproduce.report import render_report

    path = ROOT / "docs/results" / run
    summary = json.loads((path if path.suffix else path / "summary.json").read_text())
    header = render_report(summary, summary["environment"]).split("\n")[2]
    cfg = summary["config"]
    assert ("peer row" in header) == (cfg["qi_augmentation"] and not cfg.get("frontier_only"))
    assert (
        f"Aligned analogs (each the base after {summary['config']['align_steps']} steps of refusal SFT): " + expected
        in header
    )


def test_the_frontier_answer_leads_with_yes_or_no_only_where_the_verdicts_decide():
    from bft.pipelines.reproduce.readme import _frontier_answer

    decided = [
        ("deep", "perplexity", "dominated"),
        ("shallow", "perplexity", "dominated"),
        ("deep", "overrefusal", "dominated by point estimates only: inconclusive within the intervals"),
        ("shallow", "overrefusal", "not dominated by the point estimates only: inconclusive within the intervals"),
    ]
    text = _frontier_answer(decided)
    assert text.startswith("**In short: no BFT checkpoint safer than the aligned model escapes Qi's curve")
    assert "Against benign perplexity: Qi's curve dominates every BFT checkpoint safer than the aligned model, " in text
    assert "beyond the intervals (deep and shallow analogs). Against over-refusal: " in text
    assert "by the point estimates only, inconclusive (deep analog); some safer BFT checkpoints escape" in text
    escaped = _frontier_answer([*decided, ("shallow", "perplexity+overrefusal", "not dominated, beyond the intervals")])
    assert escaped.startswith("**In short: yes: a BFT checkpoint safer than the aligned model escapes Qi's curve")
    assert "(shallow analog).**" in escaped
    one_seed = "inconclusive: one training seed (a headline needs two; the one seed reads: dominated)"
    undecided = _frontier_answer([*decided, ("deep", "perplexity+overrefusal", one_seed)])
    assert undecided.startswith("**In short: no verdict on every question; where there is one, no BFT checkpoint")
    assert f"Against benign perplexity and over-refusal together: {one_seed} (deep analog)." in undecided
