"""The miniature reproduction (bft reproduce / bft demo) end to end on a tiny random model saved to disk.

The real run uses SmolLM2-135M-Instruct (minutes to an hour); here every stage runs at toy sizes on a tiny random
Llama so the wiring — data split, refusal SFT, analysis, BFT training, attacks, report, stage cache — is tested in CI.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from bft.kernels.params import COMPLETION_TERMS
from helpers import tiny_reproduce_config as _tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from bft.pipelines.reproduce import reproduce

    out = tmp_path_factory.mktemp("repro")
    logs = []
    cfg = _tiny_config(tiny_model_dir, out)
    summary = reproduce(cfg, log=logs.append)
    return cfg, out, summary, logs


def test_every_stage_writes_its_outputs(tiny_run):
    cfg, out, summary, _ = tiny_run
    for stage in (
        "data",
        "aligned_r0",
        "shallow/analysis_aligned",
        "shallow/bft",
        "shallow/analysis_student",
        "shallow/pull",
        "shallow/eval",
    ):
        assert (out / stage / "stage.json").is_file(), stage
    assert (out / "models" / "aligned_r0" / "config.json").is_file()
    assert (out / "shallow" / "bft" / "final" / "config.json").is_file()
    assert (out / "plots" / "kl_by_position_shallow.png").stat().st_size > 0
    assert (out / "shallow" / "analysis_aligned" / "fig1_position_profile.png").is_file()
    assert (out / "shallow" / "eval" / "main" / "results.json").is_file()
    assert (out / "shallow" / "eval" / "alpha_sweep" / "results.json").is_file()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["analogs"]["shallow"]["claims"].keys() == summary["analogs"]["shallow"]["claims"].keys()
    report = (out / "REPORT.md").read_text()
    for name in ("| base |", "| aligned |", "| contrastive α=1 |", "| bft student |", "| contrastive α=2 |"):
        assert name in report
    assert "The paper's claims at this scale" in report and "Verdicts at a glance" in report


def test_train_validation_and_test_prompts_are_disjoint(tiny_run):
    _, out, summary, _ = tiny_run
    read = lambda name: [json.loads(x) for x in (out / "data" / name).read_text().splitlines() if x.strip()]  # noqa: E731
    train, val, test = read("harmful_train.jsonl"), read("harmful_val.jsonl"), read("harmful_test.jsonl")
    assert train and val and test
    sets = [{r["prompt"] for r in part} for part in (train, val, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert all(r["response"].strip() for r in train + val + test)  # the base model's own (non-refusal) responses
    assert summary["data"]["harmful_test"] == len(test) and summary["data"]["harmful_val"] == len(val)
    benign = [{r["prompt"] for r in read(f"benign_{p}.jsonl")} for p in ("train", "val", "test")]
    assert not benign[0] & benign[1] and not benign[1] & benign[2]


def test_summary_numbers_come_from_the_eval_records(tiny_run):
    _, out, summary, _ = tiny_run
    summary = summary["analogs"]["shallow"]
    results = json.loads((out / "shallow" / "eval" / "main" / "results.json").read_text())
    recs = [r for r in results["records"]["aligned"]["prefill"] if r["k"] == 2]
    keyword = sum(r["judgements"]["keyword"] for r in recs) / len(recs)
    assert summary["systems"]["aligned"]["asr"]["2"]["keyword"] == pytest.approx(keyword)
    cut = summary["claims"]["bft_cuts_prefill_asr_50pct"]["keyword"]
    if cut["aligned"]:
        assert cut["relative_cut"] == pytest.approx(1 - cut["student"] / cut["aligned"])
    assert set(summary["systems"]) == {"base", "aligned", "contrastive α=1", "bft student", "contrastive α=2"}


def test_rerun_reuses_every_stage_and_a_changed_stage_recomputes_the_rest(tiny_run, tiny_model_dir, monkeypatch):
    from bft.pipelines.reproduce import reproduce

    cfg, out, summary, _ = tiny_run
    logs = []
    again = reproduce(cfg, log=logs.append)
    assert sum("cached" in line for line in logs) == 7, logs
    assert again["analogs"]["shallow"]["systems"] == summary["analogs"]["shallow"]["systems"]
    # the same run spelled as a relative path is the same run: nothing recomputed, the student kept
    monkeypatch.chdir(out.parent)
    logs = []
    reproduce(_tiny_config(tiny_model_dir, out.name), log=logs.append)
    assert sum("cached" in line for line in logs) == 7, logs
    assert (out / "shallow" / "bft" / "final").is_dir()
    monkeypatch.undo()
    # a change to the eval settings reruns only the eval
    logs = []
    reproduce(_tiny_config(tiny_model_dir, out, eval_tokens=3), log=logs.append)
    assert sum("cached" in line for line in logs) == 6, logs
    assert any(line.startswith("[shallow/eval] running") for line in logs)


def test_a_run_folder_copied_elsewhere_is_the_same_run(tiny_run, tiny_model_dir, tmp_path):
    """stage.json stores paths under the run folder relative to it, and the teacher cache knows its data by content:
    a copied run reuses every stage, and a changed student trains from the copied cache instead of failing on it."""
    from bft.pipelines.reproduce import reproduce

    cfg, out, _, _ = tiny_run
    summary = reproduce(cfg, log=lambda m: None)  # back to the fixture's settings (a test before may change them)
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    marker = json.loads((moved / "shallow" / "bft" / "stage.json").read_text())
    assert marker["settings"]["model"]["aligned"] == "<run>/models/aligned_r0"
    logs = []
    again = reproduce(_tiny_config(tiny_model_dir, moved), log=logs.append)
    assert sum("cached" in line for line in logs) == 7, logs
    assert again["analogs"]["shallow"]["systems"] == summary["analogs"]["shallow"]["systems"]
    manifests = {p: p.stat().st_mtime_ns for p in (moved / "teacher_cache").rglob("manifest.json")}
    assert manifests
    logs = []
    reproduce(_tiny_config(tiny_model_dir, moved, bft_steps=3), log=logs.append)
    assert any(line.startswith("[shallow/bft] running") for line in logs), logs
    assert {p: p.stat().st_mtime_ns for p in (moved / "teacher_cache").rglob("manifest.json")} == manifests
    # a cache fingerprinted by older code (a data file known by its path) is the run's own: rebuilt, not an error
    (manifest,) = manifests
    stale = json.loads(manifest.read_text())
    stale["fingerprint"]["data.harmful"]["source"] = str(out / "data" / "harmful_train.jsonl")
    manifest.write_text(json.dumps(stale))
    logs = []
    reproduce(_tiny_config(tiny_model_dir, moved, bft_steps=4), log=logs.append)
    assert any(line.startswith("[shallow/bft] rebuilding the teacher cache") for line in logs), logs
    assert (
        json.loads(manifest.read_text())["fingerprint"]["data.harmful"]["source"]
        != stale["fingerprint"]["data.harmful"]["source"]
    )


def test_bad_sizes_are_refused():
    from bft.pipelines.reproduce import ReproduceConfig, validate

    with pytest.raises(ValueError, match="prefill_ks needs at least one k > 0"):
        validate(ReproduceConfig(prefill_ks=[0]))
    with pytest.raises(ValueError, match="n_test must be >= 1"):
        validate(ReproduceConfig(n_test=0))
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        validate(ReproduceConfig(eval_batch_size=0))


def test_interrupted_bft_stage_resumes_and_an_upstream_change_discards_its_checkpoints(tiny_model_dir, tmp_path):
    """Killed during BFT training: the rerun resumes from the checkpoint. A recomputed upstream stage (here a new
    aligned model under the same path) must not resume from checkpoints trained on the old one."""
    from bft.pipelines.reproduce import reproduce

    cfg = _tiny_config(tiny_model_dir, tmp_path, bft_steps=4)
    reproduce(cfg, log=lambda m: None)
    bft_dir = tmp_path / "shallow" / "bft"
    (bft_dir / "stage.json").unlink()  # as if the process died after the last checkpoint, before the stage ended
    (bft_dir / "final" / "config.json").unlink()
    logs = []
    reproduce(cfg, log=logs.append)
    assert any(line.startswith("[shallow/bft] resuming from") for line in logs), logs
    assert (bft_dir / "final" / "config.json").is_file()
    # interrupted again, then the run folder moved: its settings.json names paths relative to the run, so it resumes
    (bft_dir / "stage.json").unlink()
    (bft_dir / "final" / "config.json").unlink()
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.move(tmp_path, moved)
    logs = []
    reproduce(_tiny_config(tiny_model_dir, moved, bft_steps=4), log=logs.append)
    assert any(line.startswith("[shallow/bft] resuming from") for line in logs), logs
    shutil.move(moved, tmp_path)
    logs = []
    reproduce(_tiny_config(tiny_model_dir, tmp_path, bft_steps=4, align_steps=3), log=logs.append)
    assert any(line.startswith("[aligned_r0] running") for line in logs)
    assert not any(line.startswith("[shallow/bft] resuming") for line in logs), logs


def test_two_fresh_runs_give_the_same_numbers(tiny_run, tiny_model_dir, tmp_path):
    """Seeded end to end (data, refusal SFT, BFT, sampled attacks): a fresh run in another folder repeats every number."""
    from bft.pipelines.reproduce import reproduce

    cfg, _, summary, _ = tiny_run
    again = reproduce(_tiny_config(tiny_model_dir, tmp_path), log=lambda m: None)
    assert again["analogs"]["shallow"]["systems"] == summary["analogs"]["shallow"]["systems"]
    assert again["analogs"]["shallow"]["analysis"] == summary["analogs"]["shallow"]["analysis"]


def test_both_eq7_forms_seeds_intervals_and_verdicts(tiny_model_dir, tmp_path):
    """Both forms of Eq. 7 as system rows, two sampling seeds pooled, a Wilson interval on every ASR and a paired
    test with a three-valued verdict on every reduction claim, harm judge first."""
    from bft.eval.stats import wilson_interval
    from bft.pipelines.reproduce import reproduce

    cfg = _tiny_config(
        tiny_model_dir,
        tmp_path,
        forms=["logprobs", "logits"],
        eval_seeds=2,
        alphas=[],
        eval_batch_size=2,
        analogs={"deep": 0.5},
        recovery_max_tokens=3,
    )  # the deeper analog's recipe too
    summary = reproduce(cfg, log=lambda m: None)["analogs"]["deep"]
    assert {"contrastive α=1", "contrastive (logits) α=1"} <= set(summary["systems"])
    assert summary["primary_judge"] == "harm"
    seeds = [json.loads((tmp_path / "deep" / "eval" / d / "results.json").read_text()) for d in ("main", "main_seed1")]
    recs = [r for res in seeds for r in res["records"]["aligned"]["prefill"] if r["k"] == 2]
    harmful = sum(bool(r["judgements"]["harm"]) for r in recs)
    asr = summary["systems"]["aligned"]["asr"]["2"]
    assert asr["n_rows"]["harm"] == len(recs) == 2 * cfg.n_test
    assert asr["ci_rows"]["harm"] == pytest.approx(list(wilson_interval(harmful, len(recs))))
    assert asr["harm"] == pytest.approx(harmful / len(recs))  # the reported rate is the pooled one, like its interval
    # the further seed reruns only the attack the claims are judged at; k = 0 has the first seed's rows alone
    assert {r["k"] for r in seeds[1]["records"]["aligned"]["prefill"]} == {2}
    assert summary["systems"]["aligned"]["asr"]["0"]["n_rows"]["harm"] == cfg.n_test
    for key in (
        "contrastive_cuts_prefill_asr_90pct",
        "contrastive_logits_cuts_prefill_asr_90pct",
        "bft_cuts_prefill_asr_50pct",
    ):
        claim = summary["claims"][key]
        assert set(claim["verdict"]) >= {"harm", "keyword"}
        assert all(
            v.split(" (")[0] in ("reproduced", "not reproduced", "inconclusive") for v in claim["verdict"].values()
        )
    report = (tmp_path / "REPORT.md").read_text()
    assert "| contrastive (logits) α=1 |" in report and "McNemar" in report and "2 sampling seeds at k = 2" in report
    assert "50% safety-recovery examples" in report
    stage = json.loads((tmp_path / "aligned_r0.5" / "stage.json").read_text())
    assert stage["settings"]["recovery_share"] == 0.5


def test_the_powered_protocol_calibration_sweep_ablations_and_qi_row(tiny_model_dir, tmp_path):
    """Two analogs (the deeper one's recovery share chosen on validation), the loss sweep and its ablations scored on
    validation only, the chosen point training every analog's student, Qi et al.'s augmentation as a system row,
    the long prefills on fewer prompts, and a report with every table."""
    from bft.pipelines.reproduce import reproduce
    from bft.pipelines.reproduce.stages import point_id

    cfg = _tiny_config(
        tiny_model_dir,
        tmp_path,
        analogs={"shallow": 0.0, "deep": "auto"},
        recovery_candidates=[0.3, 0.9],
        recovery_max_tokens=3,
        qi_augmentation=True,
        qi_steps=1,
        sweep={"alpha_base": [0.5, 2.0], "l2_reg": [1e-3], "teacher_lambda": [1.0]},
        sweep_steps=1,
        ablations=["kl_only", "no_adaptive_alpha", "completion_only"],
        prefill_ks=[0, 2, 3],
        long_k_prompts=2,
        alphas=[],
    )
    summary = reproduce(cfg, log=lambda m: None)
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]  # noqa: E731
    val_prompts = {r["prompt"] for r in read(tmp_path / "data" / "harmful_val.jsonl")}
    test_prompts = {r["prompt"] for r in read(tmp_path / "data" / "harmful_test.jsonl")}

    cal = summary["calibration"]
    assert [c["share"] for c in cal["candidates"]][:1] == [0.3] and cal["share"] in (0.3, 0.9)
    assert summary["analogs"]["deep"]["recovery_share"] == cal["share"]
    sweep = summary["sweep"]
    assert [point_id(p["overrides"]) for p in sweep["points"]] == [
        "alpha_base-0.5_l2_reg-0.001",
        "alpha_base-2_l2_reg-0.001",
        "teacher_lambda-1",
    ]
    assert set(sweep["ablations"]) == {"kl_only", "no_adaptive_alpha", "completion_only"}
    assert sweep["ablations"]["kl_only"]["overrides"] == {**sweep["chosen"], "alpha_base": 0.0}
    assert sweep["ablations"]["completion_only"]["overrides"] == {**sweep["chosen"], "kl_weight": 0.0}
    # each point's two loss terms, from its own training log: completion = loss - kl_weight * KL
    for name, p in [(point_id(p["overrides"]), p) for p in sweep["points"]] + [
        (f"ablation_{n}", p) for n, p in sweep["ablations"].items()
    ]:
        log = read(tmp_path / "sweep" / name / "bft" / "metrics.jsonl")
        w = p["overrides"].get("kl_weight", 1.0)
        assert p["train_kl"] == pytest.approx(sum(r["kl"] for r in log) / len(log))
        assert p["train_completion"] == pytest.approx(
            max(0.0, sum(r["loss"] - w * r["kl"] for r in log) / len(log)), abs=1e-7
        )
    assert sweep["ablations"]["kl_only"]["train_completion"] == pytest.approx(0.0, abs=1e-7)
    # which way the completion penalty pulls: per sweep point on validation, per analog on test
    assert 0.0 <= sweep["aligned"]["share_negative"] <= 1.0 and sweep["aligned"]["mass_ratio"] == 1.0
    assert all(p["mass_ratio"] > 0 for p in sweep["points"] + list(sweep["ablations"].values()))
    for analog in ("shallow", "deep"):
        pull = summary["analogs"][analog]["completion_pull"]
        assert set(pull["students"]) == {"bft student", "qi augmentation"} and pull["top_k"] == cfg.top_k
        assert 0.0 < pull["aligned"]["mass_aligned"] <= 1.0
    # every choice was made on validation prompts only
    for results in tmp_path.glob("**/val/results.json"):
        prompts = {r["prompt"] for recs in json.loads(results.read_text())["records"].values() for r in recs["prefill"]}
        assert prompts <= val_prompts and not prompts & test_prompts, results
    # the chosen point trains both analogs' students, at their own budget
    for analog in ("shallow", "deep"):
        settings = json.loads((tmp_path / analog / "bft" / "settings.json").read_text())
        assert {k: settings["loss"][k] for k in sweep["chosen"]} == sweep["chosen"]
        assert settings["train"]["max_steps"] == cfg.bft_steps
        systems = summary["analogs"][analog]["systems"]
        assert {"aligned", "bft student", "qi augmentation"} <= set(systems)
        # Qi's augmentation at its own (reduced) budget, stated in the report's header
        assert len(json.loads((tmp_path / analog / "qi" / "losses.json").read_text())) == cfg.qi_steps == 1
        assert set(systems["aligned"]["asr"]) == {"0", "2", "3"}
        assert systems["aligned"]["asr"]["3"]["n"] == 2 and systems["aligned"]["asr"]["2"]["n"] == cfg.n_test
        claims = summary["analogs"][analog]["claims"]
        assert "qi_cuts_prefill_asr" in claims and "verdict" in claims["qi_cuts_prefill_asr"]
        assert claims["bft_vs_qi"]["keyword"]["verdict"] in (
            "no difference detected",
            "student lower",
            "qi lower",
            "inconclusive",
        )
    report = (tmp_path / "REPORT.md").read_text()
    for heading in (
        "## Calibrating the deeper analog",
        "## Sweep of the BFT loss",
        "Ablations at the chosen point",
        "| completion/KL |",
        "## Which way the completion penalty pulls",
        "| M mass × aligned |",
        "## Analog: shallow",
        "## Analog: deep",
        "| qi augmentation |",
        "Verdicts at a glance",
        "1 step (qi_steps: a stated reduction from the paper's equal budget)",
    ):
        assert heading in report, heading
    assert (tmp_path / "plots" / "sweep.png").stat().st_size > 0
    assert (tmp_path / "plots" / "kl_by_position_deep.png").stat().st_size > 0


def test_sweep_and_analog_settings_are_checked():
    from bft.pipelines.reproduce import ReproduceConfig, validate

    with pytest.raises(ValueError, match="sweep key 'lr' is not a loss setting"):
        validate(ReproduceConfig(sweep={"lr": [1e-4]}))
    with pytest.raises(ValueError, match="sweep_analog 'other' is not one of the analogs"):
        validate(ReproduceConfig(sweep={"l2_reg": [0.0]}, sweep_analog="other"))
    with pytest.raises(ValueError, match=r"analogs.deep must be a recovery share in \[0, 1\] or 'auto'"):
        validate(ReproduceConfig(analogs={"deep": 2.0}))
    with pytest.raises(ValueError, match="qi_steps must be >= 1"):
        validate(ReproduceConfig(qi_steps=0))
    with pytest.raises(ValueError, match="unknown ablations"):
        validate(ReproduceConfig(sweep={"l2_reg": [0.0]}, ablations=["no_kl"]))
    with pytest.raises(ValueError, match="sweep_k = 3 must be one of prefill_ks"):
        validate(ReproduceConfig(sweep_k=3))


def test_rejudge_rescores_the_stored_attacks_and_the_report_is_rebuilt_from_cache(tiny_run):
    """``bft reproduce --rejudge``: every stored results.json is judged again (no generation); the next run reuses
    every stage and rebuilds the same numbers from the re-judged verdicts."""
    from bft.pipelines.reproduce import rejudge_stored, reproduce

    cfg, out, _, _ = tiny_run
    summary = reproduce(cfg, log=lambda m: None)  # another test may have left other eval settings in the folder
    done = rejudge_stored(cfg, log=lambda m: None)
    assert str(out / "shallow" / "eval" / "main") in done
    logs = []
    again = reproduce(cfg, log=logs.append)
    assert sum("cached" in line for line in logs) == 7, logs  # the eval too: rejudged in place
    assert again["analogs"]["shallow"]["systems"] == summary["analogs"]["shallow"]["systems"]


def test_the_sweep_takes_completion_terms_and_selection_rules_and_refuses_l2_reg_for_the_other_terms():
    from bft.pipelines.reproduce import ReproduceConfig, validate
    from bft.pipelines.reproduce.config import DEFAULT_SWEEP, default_sweep
    from bft.pipelines.reproduce.stages import point_id, sweep_points

    cfg = ReproduceConfig(
        sweep={"completion": ["mass", "unlikelihood"], "selection": ["base_topp"], "selection_top_p": [0.5]}
    )
    validate(cfg)
    assert [point_id(p) for p in sweep_points(cfg)] == [
        "completion-mass",
        "completion-unlikelihood",
        "selection-base_topp",
        "selection_top_p-0.5",
    ]
    with pytest.raises(
        ValueError,
        match=rf"^sweep.completion: completion must be one of {re.escape(str(COMPLETION_TERMS))}, got 'l1'",
    ):
        validate(ReproduceConfig(sweep={"completion": ["mass", "l1"]}))
    with pytest.raises(ValueError, match=r"^sweep.selection: selection must be one of \('vocab', 'base_topp'\)"):
        validate(ReproduceConfig(sweep={"selection": ["nucleus"]}))
    with pytest.raises(
        ValueError,
        match=r"^sweep.l2_reg scales completion='l2' only and this run's completion is "
        r"'mass'",
    ):
        validate(ReproduceConfig(sweep={"l2_reg": [1e-4]}, loss_overrides={"completion": "mass"}))
    assert default_sweep() == DEFAULT_SWEEP and "l2_reg" not in default_sweep("unlikelihood")
    with pytest.raises(ValueError, match=r"^loss_overrides: selection must be one of \('vocab', 'base_topp'\)"):
        validate(ReproduceConfig(loss_overrides={"selection": "nucleus"}))


def test_bft_reproduce_maps_the_default_sweep_and_refuses_an_unknown_term_in_one_line(capsys):
    import argparse

    from bft.cli import console_main
    from bft.commands.reproduce import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--sweep", "loss_overrides.completion=mass"]))
    assert "l2_reg" not in cfg.sweep and cfg.sweep["alpha_base"] == [0.3, 1.0, 3.0]
    cfg = config_from_args(parser.parse_args(["--paper", "loss_overrides.completion=unlikelihood"]))
    assert "l2_reg" not in cfg.sweep
    assert "l2_reg" in config_from_args(parser.parse_args(["--sweep"])).sweep
    assert console_main(["reproduce", "loss_overrides.completion=logits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"completion must be one of {COMPLETION_TERMS}, got 'logits'" in err


@pytest.mark.parametrize("completion", COMPLETION_TERMS)
def test_the_kl_only_ablation_removes_every_completion_term(completion):
    """kl_only at a point with any completion term leaves the KL alone: the loss and gradients equal those of the
    same rows with no harmful row (l2_reg = 0 would leave every term but "l2" on)."""
    import bft
    from bft.pipelines.reproduce.config import ABLATIONS

    g = torch.Generator().manual_seed(0)
    sh, sw = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    rest = [
        torch.randn(6, 8, generator=g),
        torch.randn(40, 8, generator=g),
        torch.randn(6, 8, generator=g),
        torch.randn(40, 8, generator=g),
    ]
    harmful = torch.ones(6, dtype=torch.bool)

    def loss(overrides, harmful):
        x = sh.clone().requires_grad_(True)
        out = bft.bft_loss(
            x, sw, *rest, harmful=harmful, top_k=5, completion=completion, backend="reference", **overrides
        )
        out.loss.backward()
        return out.loss.detach(), x.grad

    kl_loss, kl_grad = loss({}, torch.zeros(6, dtype=torch.bool))
    got_loss, got_grad = loss(ABLATIONS["kl_only"], harmful)
    torch.testing.assert_close(got_loss, kl_loss)
    torch.testing.assert_close(got_grad, kl_grad)
    full_loss, _ = loss({}, harmful)
    assert full_loss > kl_loss  # the term is really there without the ablation


def test_stop_after_sweep_scores_the_sweep_and_stops(tiny_model_dir, tmp_path, capsys):
    """``stop_after: sweep``: data, the aligned analog and every sweep point (student, validation, completion pull)
    are computed; no analysis, student, test eval or report. A bad value or one without a sweep is refused."""
    import argparse

    from bft.commands.reproduce import add_arguments, run
    from bft.pipelines.reproduce import ReproduceConfig, reproduce, validate

    cfg = _tiny_config(
        tiny_model_dir, tmp_path, sweep={"completion": ["l2", "mass"]}, sweep_steps=1, ablations=[], stop_after="sweep"
    )
    validate(cfg)
    summary = reproduce(cfg, log=lambda m: None)
    assert summary["stopped_after"] == "sweep" and "analogs" not in summary
    assert [p["overrides"] for p in summary["sweep"]["points"]] == [{"completion": "l2"}, {"completion": "mass"}]
    for point in ("completion-l2", "completion-mass"):
        pull = json.loads((tmp_path / "sweep" / point / "pull" / "completion_pull.json").read_text())
        assert set(pull["students"]) == {"student"}
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_after"] == "sweep"
    assert not (tmp_path / "shallow").exists() and not (tmp_path / "REPORT.md").exists()
    assert (tmp_path / "plots" / "sweep.png").stat().st_size > 0
    # the command says where the results are (every stage cached now) instead of printing a report
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert run(parser.parse_args(["--config", str(cfg_file)])) == 0
    assert "Stopped after the sweep (stop_after)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"stop_after must be one of \[None, 'sweep'\], got 'eval'"):
        validate(ReproduceConfig(stop_after="eval"))
    with pytest.raises(ValueError, match="stop_after: sweep needs a sweep"):
        validate(ReproduceConfig(stop_after="sweep"))


def test_the_split_keeps_near_duplicate_clusters_whole(monkeypatch, tmp_path):
    """With dedup_threshold set, train takes whole near-duplicate clusters and the held-out pool one prompt per
    cluster (the clustering itself is tested in tests/eval/test_dedup.py; here a fake one pairs prompts 2i, 2i+1)."""
    from bft.pipelines.reproduce import stages

    seen = {}

    def pairs(texts, threshold):
        seen["threshold"] = threshold
        return [int(t[1:]) // 2 for t in texts]

    monkeypatch.setattr(stages, "near_duplicate_groups", pairs)
    rows = [{"prompt": f"p{i}", "source": "s"} for i in range(40)]
    cfg = _tiny_config("unused", tmp_path, n_train=6, n_val=3, n_test=3, dedup_threshold=0.85)
    train, held_out = stages.split_prompts(rows, cfg)
    assert seen["threshold"] == 0.85
    cluster = {f"p{i}": i // 2 for i in range(40)}
    train_clusters = {cluster[r["prompt"]] for r in train}
    held_clusters = [cluster[r["prompt"]] for r in held_out]
    assert len(train) == 6 and len(train_clusters) == 3  # whole pairs
    assert not train_clusters & set(held_clusters)  # no cluster on both sides
    assert len(held_clusters) == len(set(held_clusters)) == 17  # one prompt per remaining cluster
    with pytest.raises(ValueError, match="near-duplicate clusters"):
        stages.split_prompts(
            rows, _tiny_config("unused", tmp_path, n_train=6, n_val=10, n_test=10, dedup_threshold=0.85)
        )


COMMITTED_CONFIGS = sorted((Path(__file__).parents[2] / "docs" / "results").glob("**/config*.yaml"))


@pytest.mark.parametrize("path", COMMITTED_CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_committed_run_config_loads_and_validates(path):
    """README tells users to rerun the committed runs with `bft reproduce --config <file>`: each file must still
    be read and accepted by this code (a renamed or removed key is caught here, not an hour into a run)."""
    import argparse

    from bft.commands.reproduce import config_from_args
    from bft.pipelines.reproduce import validate

    validate(config_from_args(argparse.Namespace(config=str(path), out=None)))


def test_the_committed_run_configs_are_found():
    assert len(COMMITTED_CONFIGS) >= 4
