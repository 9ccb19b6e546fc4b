"""The frontier (bft.pipelines.reproduce.frontier) on the tiny random Llama: checkpoints along the
budget for Qi's augmentation and the BFT student, their evaluation, the cache and the resume, the dominance rules on
hand-made points, the plot and the table, and the validation of the frontier keys."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_reproduce_config as _tiny_config

torch.set_num_threads(1)

FRONTIER = dict(
    bft_steps=4,
    frontier=True,
    frontier_fractions=[0.25, 0.5, 1.0],  # steps 1, 2 and 4 of 4
    frontier_seeds=[0, 1],
    frontier_ks=[2, 3],
    frontier_prompts=2,
    frontier_eval_seeds=2,
    gsm8k_limit=0,
    alphas=[],
    analogs={"shallow": 0.0, "deep": 0.5},
    frontier_analogs=["shallow"],
    frontier_diagnostic=["shallow", "deep"],  # the shallow analog's student with the deep analog's teacher
    frontier_overrefusal_limit=3,  # over-refusal on 3 benign prompts, a second utility axis
)


FIRST_RUN_LOG: list = []  # the fixture's log lines, in order


@pytest.fixture(scope="module")
def frontier_run(tiny_model_dir, tmp_path_factory):
    from bft.pipelines.reproduce import reproduce

    out = tmp_path_factory.mktemp("frontier")
    cfg = _tiny_config(tiny_model_dir, out, **FRONTIER)
    summary = reproduce(cfg, log=FIRST_RUN_LOG.append)
    return cfg, out, summary


def _stage_log(cfg, **changes):
    from bft.pipelines.reproduce import reproduce

    logs = []
    summary = reproduce(dataclasses.replace(cfg, **changes), log=logs.append)
    return summary, logs


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_exist_at_every_fraction_for_every_method_and_seed(frontier_run):
    from bft.trainer import checkpoint as ckpt

    cfg, out, summary = frontier_run
    for seed in (0, 1):
        qi = out / "models" / "frontier" / "shallow" / "qi" / f"seed{seed}"
        assert sorted(p.name for p in qi.iterdir()) == ["step-00000001", "step-00000002", "step-00000004"]
        assert all((qi / s / "config.json").is_file() for s in ("step-00000001", "step-00000004"))
        train = out / "frontier" / "shallow" / "bft_eq9" / f"seed{seed}" / "train"
        kept = [s for s, _ in ckpt.list_checkpoints(train)]
        assert {1, 2, 4} <= set(kept), kept
        assert json.loads((train / "settings.json").read_text())["train"]["save_at_steps"] == [1, 2, 4]
        assert json.loads((train / "settings.json").read_text())["train"]["seed"] == seed
    # the two training seeds are two runs: their checkpoints differ
    a = torch.load(out / "frontier/shallow/bft_eq9/seed0/train/checkpoints/step-00000004/trainable.pt")
    b = torch.load(out / "frontier/shallow/bft_eq9/seed1/train/checkpoints/step-00000004/trainable.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the intermediate checkpoints of the second seed are not evaluated (frontier_curve_seeds = 1), its headline is
    assert (out / "frontier/shallow/qi/seed1/eval_step4/stage.json").is_file()
    assert not (out / "frontier/shallow/qi/seed1/eval_step1").exists()
    assert (out / "frontier/shallow/qi/seed0/eval_step1/stage.json").is_file()


def test_a_checkpoint_merged_in_memory_is_the_trainers_final_student(frontier_run):
    from bft.pipelines.reproduce.frontier import student_at_checkpoint
    from bft.pipelines.reproduce.stages import load_pretrained

    cfg, out, _ = frontier_run
    train = out / "frontier/shallow/bft_eq9/seed0/train"
    settings = yaml.safe_load((train / "config.yaml").read_text())  # the trainer's runnable config
    merged, _ = student_at_checkpoint(settings, train / "checkpoints/step-00000004", cfg)
    final, _ = load_pretrained(str(train / "final"), cfg)
    ref = final.state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-6)
    early, _ = student_at_checkpoint(settings, train / "checkpoints/step-00000001", cfg)
    assert any(not torch.allclose(v, ref[n]) for n, v in early.state_dict().items())


def test_the_trainer_keeps_save_at_steps_whatever_keep_checkpoints_says(tmp_path):
    import yaml
    from bft.trainer import checkpoint as ckpt
    from bft.trainer.config import ConfigError, config_from_dict
    from bft.trainer.train import train

    config = yaml.safe_load((Path(__file__).parents[2] / "trainer" / "configs" / "tiny-cpu.yaml").read_text())
    config["train"].update(
        max_steps=6, save_every=1, keep_checkpoints=1, save_at_steps=[2, 3], output_dir=str(tmp_path), device="cpu"
    )
    train(config_from_dict(config), progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3, 6]
    with pytest.raises(ConfigError, match="save_at_steps"):
        config_from_dict({**config, "train": {**config["train"], "save_at_steps": [0]}})
    with pytest.raises(ConfigError, match="save_at_steps"):  # TRL's trainer saves on its own schedule
        config_from_dict({**config, "train": {**config["train"], "engine": "trl"}})


# ------------------------------------------------------------------------------------------------ cache and resume


def test_a_finished_frontier_is_reused(frontier_run):
    cfg, out, summary = frontier_run
    again, logs = _stage_log(cfg)
    assert not [m for m in logs if "running" in m], [m for m in logs if "running" in m]
    assert any("frontier/shallow/qi/seed1/eval_step4] cached" in m for m in logs)
    assert again["frontier"]["analogs"] == json.loads(json.dumps(summary["frontier"]["analogs"]))


def test_an_interrupted_run_resumes_and_keeps_the_evaluations_of_its_earlier_checkpoints(
    frontier_run, tmp_path, monkeypatch
):
    import bft.pipelines.reproduce.stages as stages

    # in the fixture's own folder (a run folder cannot be moved: the teacher cache names its models' paths); the
    # test ends with the run complete again. frontier_only: the frontier's stages alone, in their own order (the
    # per-analog stages would train the shallow analog's shared student first)
    cfg, run, summary = frontier_run
    cfg = dataclasses.replace(cfg, frontier_only=True)
    bft_train = run / "frontier/shallow/bft_eq9/seed0/train"
    qi_models = run / "models/frontier/shallow/qi/seed0"
    # the state a crash after step 2 leaves: no stage marker, no later checkpoints
    (bft_train / "stage.json").unlink()
    for step in (3, 4):
        shutil.rmtree(bft_train / f"checkpoints/step-0000000{step}")
    (run / "frontier/shallow/qi/seed0/train/stage.json").unlink()
    shutil.rmtree(qi_models / "step-00000004")
    early_qi = (qi_models / "step-00000001" / "model.safetensors").stat().st_mtime_ns

    # a second crash, in the resumed BFT run at step 3: its checkpoint 3 is written, no stage marker. Qi's run (it
    # comes first) is replayed and finished in this invocation
    real_train, real_sft, calls = stages.train, stages.refusal_finetune, []

    def crash_at_3(config, *, resume=False, callbacks=(), progress=True):
        def stop(step, metrics):
            if step == 3:
                raise KeyboardInterrupt("simulated crash")

        return real_train(config, resume=resume, callbacks=(*callbacks, stop), progress=progress)

    monkeypatch.setattr(stages, "train", crash_at_3)  # the training stage (stages.train_stage) calls it
    # Qi's runs (stages.qi_finetune) call it
    monkeypatch.setattr(stages, "refusal_finetune", lambda *a, **k: calls.append(k["seed"]) or real_sft(*a, **k))
    logs = []
    with pytest.raises(KeyboardInterrupt):
        from bft.pipelines.reproduce import reproduce

        reproduce(cfg, log=logs.append)
    assert calls == [1]  # only seed 0's Qi run (training seed s runs with seed s + 1) is replayed
    assert any("replaying the deterministic run" in m for m in logs)
    assert (qi_models / "step-00000004" / "model.safetensors").is_file()
    assert (qi_models / "step-00000001" / "model.safetensors").stat().st_mtime_ns == early_qi  # not rewritten
    # the replay is deterministic: the recreated checkpoint is the same model, its evaluation is reused
    assert any("frontier/shallow/qi/seed0/eval_step4] cached" in m for m in logs), logs
    assert not (bft_train / "stage.json").is_file()
    assert (bft_train / "checkpoints/step-00000003/state.json").is_file()

    monkeypatch.setattr(stages, "train", real_train)
    again, logs = _stage_log(cfg)
    assert any("resuming from" in m and "step-00000003" in m for m in logs), logs
    running = sorted(m.split("]")[0][1:] for m in logs if m.endswith("running ..."))
    # the evaluations of the checkpoints that were already there are reused (their weights are unchanged), and the
    # resumed run's last checkpoint is the uninterrupted run's (the trainer resumes exactly)
    assert running == ["frontier/shallow/bft_eq9/seed0/train"], running
    assert again["frontier"]["analogs"] == json.loads(json.dumps(summary["frontier"]["analogs"]))
    _, logs = _stage_log(frontier_run[0])  # the per-analog stages read the resumed student: the same, all cached
    assert not [m for m in logs if m.endswith("running ...")]


def test_an_earlier_qi_checkpoint_replays_only_the_steps_up_to_it(frontier_run, monkeypatch):
    import bft.pipelines.reproduce.stages as stages

    cfg, run, summary = frontier_run
    qi_models = run / "models/frontier/shallow/qi/seed0"
    stored = json.loads((run / "frontier/shallow/qi/seed0/train/losses.json").read_text())
    written = {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in qi_models.iterdir()}
    real_sft, calls = stages.refusal_finetune, []
    monkeypatch.setattr(stages, "refusal_finetune", lambda *a, **k: calls.append(k) or real_sft(*a, **k))

    more, logs = _stage_log(cfg, frontier_qi_fractions=[0.25, 0.5, 0.75, 1.0])  # Qi alone gains step 3 of 4
    running = sorted(m.split("]")[0][1:] for m in logs if m.endswith("running ..."))
    assert running == [
        "frontier/shallow/qi/seed0/eval_step3",
        "frontier/shallow/qi/seed0/train",
        "frontier/shallow/qi/seed1/train",
    ], running  # the BFT runs keep frontier_fractions; seed 1's curve is not evaluated (frontier_curve_seeds 1)
    assert [(k["seed"], k["steps"]) for k in calls] == [(1, 3), (2, 3)]  # 3 of 4 steps, not the whole run
    for name, mtime in written.items():  # the checkpoints already written are kept as they are
        assert (qi_models / name / "model.safetensors").stat().st_mtime_ns == mtime
    assert (qi_models / "step-00000003" / "model.safetensors").is_file()
    train = run / "frontier/shallow/qi/seed0/train"
    assert json.loads((train / "losses.json").read_text())[3:] == stored[3:]
    assert json.loads((train / "replay.json").read_text())["max_abs_loss_drift"] < 1e-6  # the same run
    fractions = [p["fraction"] for p in more["frontier"]["analogs"]["shallow"]["points"] if p["method"] == "qi"]
    assert fractions == [0.25, 0.5, 0.75, 1.0] and more["frontier"]["qi_fractions"] == [0.25, 0.5, 0.75, 1.0]
    assert more["frontier"]["fractions"] == [0.25, 0.5, 1.0]

    calls.clear()
    again, logs = _stage_log(cfg)  # back to the fixture's fractions: nothing is trained again
    assert not calls
    assert again["frontier"]["analogs"] == json.loads(json.dumps(summary["frontier"]["analogs"]))
    for seed in (0, 1):
        shutil.rmtree(run / f"models/frontier/shallow/qi/seed{seed}/step-00000003")


def test_one_training_seeds_curves_are_whole_before_the_next_seed_starts(frontier_run):
    running = [m.split("]")[0][1:] for m in FIRST_RUN_LOG if m.endswith("running ...")]
    frontier = [n for n in running if n.startswith("frontier/shallow/") and "/seed" in n and "diagnostic" not in n]
    seeds = [int(name.split("/seed")[1].split("/")[0]) for name in frontier]
    assert seeds == sorted(seeds) and set(seeds) == {0, 1}, frontier  # every seed-0 stage before any seed-1 stage
    assert {name.split("/")[2] for name in frontier} == {"qi", "bft_eq9"}


def test_frontier_only_skips_the_main_stages_and_keeps_the_frontier(frontier_run):
    cfg, out, summary = frontier_run
    only, logs = _stage_log(cfg, frontier_only=True)
    assert not [m for m in logs if m.endswith("running ...")]
    main = [m for m in logs if not m.startswith("[frontier/") and ("/bft]" in m or "/eval]" in m or "analysis" in m)]
    assert not main  # the main stages are not even read
    assert only["analogs"] == {} and only["primary_judge"] == cfg.judges[0]
    assert only["frontier"]["analogs"] == json.loads(json.dumps(summary["frontier"]["analogs"]))
    assert "## Curves, not points" in (out / "REPORT.md").read_text()
    _stage_log(cfg)  # back to the fixture's summary.json for the tests after this one


def test_the_per_analog_student_is_the_frontiers_run_of_the_same_student(frontier_run):
    cfg, out, summary = frontier_run
    # shallow: in the frontier, whose bft_eq9 run at training seed cfg.seed has the per-analog loss; deep: not
    assert summary["analogs"]["shallow"]["student_stage"] == f"frontier/shallow/bft_eq9/seed{cfg.seed}/train"
    assert summary["analogs"]["deep"]["student_stage"] == "deep/bft"
    running = [m.split("]")[0][1:] for m in FIRST_RUN_LOG if m.endswith("running ...")]
    assert "deep/bft" in running and "shallow/bft" not in running and not (out / "shallow/bft").exists()
    assert running.count(f"frontier/shallow/bft_eq9/seed{cfg.seed}/train") == 1  # trained once, read by both
    analysis = json.loads((out / "shallow/analysis_student/stage.json").read_text())
    assert f"frontier/shallow/bft_eq9/seed{cfg.seed}/train" in json.dumps(analysis)  # read from that run
    assert "the frontier's run (`frontier/shallow/bft_eq9/seed0/train`)" in (out / "REPORT.md").read_text()


@pytest.mark.parametrize(
    "change",
    [
        dict(frontier=False),
        dict(seed=7),  # not a frontier training seed
        dict(frontier_analogs=["deep"]),
        dict(loss_overrides={"l2_reg": 0.5}, frontier_methods=["qi"]),  # no BFT method of the frontier
    ],
)
def test_without_the_same_run_in_the_frontier_the_student_trains_on_its_own(change, tmp_path):
    from bft.pipelines.reproduce.frontier import frontier_student

    cfg = _tiny_config("unused", tmp_path, **{**FRONTIER, **change})
    # every case is decided before any stage runs: data and models are never read
    assert frontier_student(cfg, None, {}, "shallow", "unused", "aligned_r0", None, {}, print) is None


def test_resummarizing_a_frontier_run_keeps_its_frontier_section(frontier_run):
    from bft.commands.reproduce import resummarize

    cfg, out, _ = frontier_run
    report = (out / "REPORT.md").read_text()
    assert "## Curves, not points" in report
    resummarize(out)
    assert (out / "REPORT.md").read_text() == report


def test_resummarize_rejudges_a_stored_frontier_from_its_points(frontier_run, tmp_path):
    from bft.commands.reproduce import resummarize

    _, out, _ = frontier_run
    copy = tmp_path / "run"
    (copy / "frontier").mkdir(parents=True)
    for name in ("summary.json", "frontier/summary.json"):
        shutil.copy(out / name, copy / name)
    stored = json.loads((out / "summary.json").read_text())["frontier"]
    analog, res = next(iter(stored["analogs"].items()))
    utility, kept = next(iter(res["beyond_qi"].items()))
    for path in (copy / "summary.json", copy / "frontier" / "summary.json"):  # a verdict written by older rules
        data = json.loads(path.read_text())
        fr = data.get("frontier", data)
        fr["analogs"][analog]["beyond_qi"][utility]["verdict"] = "an older verdict"
        del fr["analogs"][analog]["beyond_qi"][utility]["safer_beyond_intervals"]
        path.write_text(json.dumps(data))
    changes = resummarize(copy)
    assert f"frontier / {analog} / {utility}: an older verdict → {kept['verdict']}" in changes
    assert json.loads((copy / "summary.json").read_text())["frontier"] == stored
    assert json.loads((copy / "frontier" / "summary.json").read_text()) == stored
    assert (copy / "frontier" / "FRONTIER.md").read_text().count(kept["verdict"]) >= 1
    broken = json.loads((copy / "summary.json").read_text())
    del broken["frontier"]["analogs"][analog]["points"]
    (copy / "summary.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="no 'points' list"):  # the CLI's one line and exit 2, not a KeyError
        resummarize(copy)


def test_resummarize_replaces_a_stored_span_of_over_refusal_with_the_bound_over_prompts(frontier_run, tmp_path):
    """A summary written when pooled over-refusal was the span of the seeds' intervals (no per-prompt rows kept):
    --resummarize gives each pooled point the widest interval pooling by prompt could give, re-judges, redraws."""
    from bft.commands.reproduce import resummarize
    from bft.eval.stats import cluster_wilson_bound

    _, out, _ = frontier_run
    copy = tmp_path / "run"
    copy.mkdir()
    data = json.loads((out / "summary.json").read_text())
    analog, res = next(iter(data["frontier"]["analogs"].items()))
    pooled = [p for p in res["points"] if len(p.get("training_seeds") or []) > 1 and p.get("overrefusal")]
    assert pooled
    for p in pooled:  # what an older run stored: no method, the span of two seeds' intervals
        p["overrefusal"] = {"value": 0.75, "ci": [0.2, 1.0], "n": 8}
    (copy / "summary.json").write_text(json.dumps(data))
    resummarize(copy)
    after = json.loads((copy / "summary.json").read_text())["frontier"]["analogs"][analog]
    for p in after["points"]:
        if len(p.get("training_seeds") or []) > 1 and p.get("overrefusal"):
            assert p["overrefusal"] == {"value": 0.75, "ci": cluster_wilson_bound(0.75, 8), "n": 8, "method": "bound"}
    assert (copy / after["plot"]).is_file()  # redrawn with the new error bars
    assert "n = prompts - 1" in (copy / "REPORT.md").read_text()


def test_frontier_only_needs_the_frontier(tmp_path):
    from bft.pipelines.reproduce import validate

    with pytest.raises(ValueError, match="frontier_only"):
        validate(_tiny_config("unused", tmp_path, frontier_only=True))


def test_more_frontier_work_adds_stages_and_recomputes_nothing(frontier_run):
    cfg, out, summary = frontier_run
    more, logs = _stage_log(cfg, frontier_curve_seeds=2)  # the second training seed's checkpoints join the curve
    running = {m.split("]")[0][1:] for m in logs if m.endswith("running ...")}
    assert running == {f"frontier/shallow/{m}/seed1/eval_step{s}" for m in ("qi", "bft_eq9") for s in (1, 2)}
    point = next(p for p in more["frontier"]["analogs"]["shallow"]["points"] if p["label"].startswith("qi@0.5"))
    assert point["training_seeds"] == [0, 1] and point["asr"]["2"]["harm"]["n"] == 2 * 2
    again, logs = _stage_log(cfg)  # back to the fixture's settings (for the tests after this one): all cached
    assert not [m for m in logs if m.endswith("running ...")]
    assert again["frontier"]["analogs"] == json.loads(json.dumps(summary["frontier"]["analogs"]))


def test_a_larger_benign_set_scores_every_point_in_its_own_stages_and_recomputes_nothing_else(frontier_run):
    cfg, out, summary = frontier_run
    more, logs = _stage_log(cfg, frontier_benign_prompts=7)
    running = {m.split("]")[0][1:] for m in logs if m.endswith("running ...")}
    evals = {
        name for name in summary["environment"]["stage_seconds"] if "/eval" in name and name.startswith("frontier")
    }
    assert evals and running == {"frontier/benign_data"} | {n.replace("/eval", "/benign") for n in evals}
    rows = [json.loads(line) for line in (out / "frontier/benign_data/benign.jsonl").read_text().splitlines()]
    data = {p: [json.loads(x) for x in (out / f"data/{p}.jsonl").read_text().splitlines()] for p in ("benign_test",)}
    assert len(rows) == 7 and rows[:3] == data["benign_test"]  # the test split first, then further problems
    used = {
        json.loads(x)["prompt"]
        for part in ("train", "val", "test")
        for x in (out / f"data/benign_{part}.jsonl").read_text().splitlines()
    }
    assert not used & {r["prompt"] for r in rows[3:]} and len({r["prompt"] for r in rows}) == 7
    res = more["frontier"]["analogs"]["shallow"]
    assert more["frontier"]["sizes"]["benign_prompts"] == 7
    assert all(p["perplexity"]["n"] == 7 for p in res["points"])
    before = {p["label"]: p["perplexity"]["per_prompt"] for p in summary["frontier"]["analogs"]["shallow"]["points"]}
    for point in res["points"]:  # the test split's solutions score as they did inside the evaluation stage
        for key, (total, tokens) in before[point["label"]].items():
            assert point["perplexity"]["per_prompt"][key][1] == tokens
            assert point["perplexity"]["per_prompt"][key][0] == pytest.approx(total, rel=1e-4, abs=1e-3)
    again, logs = _stage_log(cfg)  # back to the fixture's settings: all cached
    assert not [m for m in logs if m.endswith("running ...")]
    assert again["frontier"]["analogs"] == json.loads(json.dumps(summary["frontier"]["analogs"]))


def test_further_benign_problems_skip_the_window_before_them(frontier_run):
    from bft.pipelines.reproduce.stages import further_benign

    cfg, out, _ = frontier_run
    data = {
        p: [json.loads(x) for x in (out / f"data/{p}.jsonl").read_text().splitlines()]
        for p in ("benign_train", "benign_val", "benign_test")
    }
    first, later = further_benign(cfg, data, 4), further_benign(cfg, data, 3, skip=4)
    assert len(first) == 4 and len(later) == 3
    assert not {r["prompt"] for r in first} & {r["prompt"] for r in later}
    assert first[:2] == further_benign(cfg, data, 2)  # prefix-stable: the screening's window is the same rows


def test_further_benign_problems_never_repeat_a_text(monkeypatch):
    from types import SimpleNamespace

    from bft.pipelines.reproduce import stages

    texts = ["a", "b", "c", "d", "d", "a", "e", "c", "f", "g"]  # the first 2 are the splits' problems
    rows = [{"prompt": t, "response": f"solution {t}"} for t in texts]
    monkeypatch.setattr(stages.hf_data, "load", lambda src, limit, seed: SimpleNamespace(to_list=lambda: rows[:limit]))
    cfg = SimpleNamespace(n_benign_train=1, n_benign_val=1, n_benign_test=0, benign_source="gsm8k", seed=0)
    data = {"benign_train": [rows[0]], "benign_val": [rows[1]], "benign_test": []}
    got = [r["prompt"] for r in stages.further_benign(cfg, data, 6, skip=1)]
    assert got == ["d", "e", "f"]  # of the 6 after the window (c): the second d, a and c came before; up to n


def test_the_diagnostic_student_starts_from_its_own_analog_and_distills_the_other_teacher(frontier_run):
    from bft.trainer.config import ConfigError, config_from_dict

    from bft.pipelines.reproduce.frontier import student_at_checkpoint
    from bft.pipelines.reproduce.stages import load_pretrained

    cfg, out, summary = frontier_run
    train = out / "frontier/shallow/diagnostic_deep_teacher/seed0/train"
    settings = yaml.safe_load((train / "config.yaml").read_text())
    assert settings["model"]["aligned"].endswith("models/aligned_r0.5")  # the deep analog teaches
    assert settings["model"]["student"].endswith("models/aligned_r0")  # the shallow analog's model learns
    assert settings["teacher_cache"]["path"].endswith("teacher_cache/aligned_r0.5")
    merged, _ = student_at_checkpoint(settings, train / "checkpoints/step-00000004", cfg)
    shallow, _ = load_pretrained(str(out / "models/aligned_r0"), cfg)
    deep, _ = load_pretrained(str(out / "models/aligned_r0.5"), cfg)
    embed = "model.embed_tokens.weight"  # LoRA leaves the embeddings alone: they are the starting model's
    assert torch.equal(merged.state_dict()[embed], shallow.state_dict()[embed])
    assert not torch.equal(merged.state_dict()[embed], deep.state_dict()[embed])
    final, _ = load_pretrained(str(train / "final"), cfg)
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, final.state_dict()[name], rtol=0, atol=1e-6)
    res = summary["frontier"]["analogs"]["shallow"]
    point = res["points"][-1]
    assert point["method"] == "diagnostic" and point["teacher"] == "deep" and point["fraction"] == 1.0
    # a headline point: every prompt, both sampling seeds, both training seeds (each seed's run of its own)
    assert point["training_seeds"] == cfg.frontier_seeds == [0, 1]
    assert point["asr"]["2"]["harm"]["n"] == 3 * 2 * 2
    assert {s: p["asr"]["2"]["harm"]["n"] for s, p in point["by_training_seed"].items()} == {"0": 6, "1": 6}
    assert (out / "frontier/shallow/diagnostic_deep_teacher/seed1/eval_step4/stage.json").is_file()
    dom = res["dominance"]["perplexity"]["harm"]
    assert point["label"] in dom["dominated_by"]  # where it lands is reported ...
    assert all(
        point["label"] not in by[kind] for by in dom["dominated_by"].values() for kind in by
    )  # ... it rules none
    with pytest.raises(ConfigError, match="model.student"):  # without the cache the teacher would be the student
        config_from_dict({**settings, "teacher_cache": {"path": None}})


# ------------------------------------------------------------------------------------------------ the summary


def test_the_summary_plot_and_table(frontier_run):
    from bft.pipelines.reproduce.frontier import format_measure, render_frontier

    cfg, out, summary = frontier_run
    fr = summary["frontier"]
    assert json.loads((out / "summary.json").read_text())["frontier"] == json.loads(json.dumps(fr))
    assert json.loads((out / "frontier" / "summary.json").read_text()) == json.loads(json.dumps(fr))
    assert "bft_chosen resolves to Eq. 9" in " ".join(fr["notes"])  # no sweep, no variant: not trained twice
    assert not (out / "frontier/shallow/bft_chosen").exists()
    res = fr["analogs"]["shallow"]
    labels = [p["label"] for p in res["points"]]
    assert labels == [
        "aligned",
        "qi@0.25",
        "qi@0.5",
        "qi@1 (seeds 0,1)",
        "bft_eq9@0.25",
        "bft_eq9@0.5",
        "bft_eq9@1 (seeds 0,1)",
        "shallow student, deep teacher (bft_eq9)@1",
    ]
    head = res["points"][3]
    asr = head["asr"]["2"]["harm"]
    assert asr["n"] == 3 * 2 * 2 and asr["prompts"] == 3  # 3 prompts x 2 sampling seeds x 2 training seeds
    assert res["points"][1]["asr"]["2"]["keyword"]["n"] == 2  # an intermediate point: 2 prompts, one seed
    assert res["points"][1]["asr"]["3"]["threeway"]["n"] == 2
    assert head["asr"]["3"]["harm"]["n"] == 2 * 2  # the longer k: frontier_prompts, one sampling seed, 2 training seeds
    for p in res["points"]:
        lo, hi = p["perplexity"]["ci"]
        assert lo <= p["perplexity"]["value"] <= hi and p["likelihood"]["mean_logprob"] < 0
        assert len(p["perplexity"]["per_prompt"]) == p["perplexity"]["n"] > 0  # what the paired comparison reads
        lo, hi = p["overrefusal"]["ci"]
        assert -1e-9 <= lo <= p["overrefusal"]["value"] + 1e-9 and hi <= 1 and p["overrefusal"]["n"] == 3
    assert set(res["dominance"]) == {"perplexity", "overrefusal", "perplexity+overrefusal"}  # per utility axis set
    assert set(res["headline_by_training_seed"]["qi"]) == {"0", "1"}
    dom = res["dominance"]["perplexity"]["harm"]
    assert set(dom["dominated_by"]) == set(labels)
    assert set(dom["separated"]) >= set(dom["point"])  # separation can only remove dominations
    png = out / res["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = render_frontier(summary)
    assert "### shallow analog" in table and "| qi | 0.5 | 0 |" in table and "| bft_eq9 | 1 | 0,1 |" in table
    # a header and a row per point: the primary judge's table, then the same points under the other judges
    assert table.count("\n| ") == 2 * (len(labels) + 1)
    other = table[table.index("Under the other judges") :]
    assert "| keyword ASR k=2 | keyword: frontier | three-way ASR k=2 | three-way: frontier |" in other
    kw = res["points"][1]["asr"]["2"]["keyword"]
    separated = ["yes" if labels[1] in res["dominance"][u]["keyword"]["separated"] else "no" for u in res["dominance"]]
    assert f"| {format_measure(kw['asr'], kw['ci'])} | {' / '.join(separated)} |" in other
    assert render_frontier({}) == ""


# ------------------------------------------------------------------------------------------------ dominance


def _pt(method, asr, ppl, asr_ci=None, ppl_ci=None, label=None, seeds=(0, 1), n=600, fraction=1.0):
    return {
        "method": method,
        "fraction": fraction,
        "label": label or f"{method}:{asr}/{ppl}",
        "training_seeds": list(seeds),
        "asr": {"4": {"harm": {"asr": asr, "ci": asr_ci, "n": n}}},
        "perplexity": {"value": ppl, "ci": ppl_ci},
    }


def test_point_dominance_on_hand_made_points():
    from bft.pipelines.reproduce.frontier import pareto

    points = [
        _pt("qi", 0.10, 10.0, label="qi-a"),
        _pt("qi", 0.50, 5.0, label="qi-b"),
        _pt("bft", 0.20, 12.0, label="bft-dominated"),  # worse than qi-a on both axes
        _pt("bft", 0.40, 5.0, label="bft-better-asr"),  # beats qi-b on ASR at equal perplexity
        _pt("bft", 0.10, 10.0, label="bft-tie"),  # ties qi-a on both: neither dominates
        _pt("bft", 0.05, 30.0, label="bft-safest"),
    ]
    out = pareto(points, "perplexity", "harm", 4)
    assert out["dominated_by"]["bft-dominated"]["point"] == ["qi-a"]
    assert out["dominated_by"]["qi-b"]["point"] == ["bft-better-asr"]
    assert out["dominated_by"]["bft-tie"]["point"] == [] and "qi-a" not in out["dominated_by"]["qi-a"]["point"]
    assert set(out["point"]) == {"qi-a", "bft-better-asr", "bft-tie", "bft-safest"}
    # a method's own points never dominate it: a curve is not compared with itself
    own = pareto([_pt("qi", 0.1, 5.0, label="x"), _pt("qi", 0.5, 9.0, label="y")], "perplexity", "harm", 4)
    assert set(own["point"]) == {"x", "y"}


def test_interval_separated_dominance_needs_disjoint_intervals():
    from bft.pipelines.reproduce.frontier import dominates, pareto

    q = ((0.30, [0.20, 0.40]), (10.0, [9.0, 11.0]))
    overlapping = ((0.25, [0.15, 0.35]), (9.5, [8.5, 10.5]))
    asr_apart = ((0.10, [0.05, 0.15]), (10.0, [9.0, 11.0]))
    ppl_apart = ((0.30, [0.20, 0.40]), (8.0, [7.5, 8.5]))
    better_but_touching = ((0.10, [0.05, 0.20]), (10.0, [9.0, 11.0]))  # p.hi == q.lo: not disjoint
    assert dominates(overlapping, q, separated=False) and not dominates(overlapping, q, separated=True)
    assert dominates(asr_apart, q, separated=True) and dominates(ppl_apart, q, separated=True)
    assert not dominates(better_but_touching, q, separated=True)
    assert not dominates(q, q, separated=False)  # a tie on both axes
    no_ci = ((0.10, None), (9.0, None))
    assert dominates(no_ci, q, separated=False) and not dominates(no_ci, q, separated=True)
    # interval separation never makes a point dominate whose estimate is worse on an axis
    worse_ppl = ((0.05, [0.0, 0.1]), (10.5, [10.0, 11.0]))
    assert not dominates(worse_ppl, q, separated=True)
    points = [
        _pt("qi", 0.30, 10.0, [0.20, 0.40], [9.0, 11.0], label="qi"),
        _pt("bft", 0.25, 9.5, [0.15, 0.35], [8.5, 10.5], label="bft-close"),
        _pt("aligned", 0.10, 10.0, [0.05, 0.15], [9.0, 11.0], label="aligned"),
        _pt("diagnostic", 0.01, 1.0, [0.0, 0.02], [0.9, 1.1], label="diag"),
    ]
    out = pareto(points, "perplexity", "harm", 4, reference_only=("diagnostic",))
    assert out["dominated_by"]["qi"] == {"point": ["bft-close", "aligned"], "separated": ["aligned"]}
    assert out["dominated_by"]["bft-close"] == {"point": [], "separated": []}  # aligned's ppl is worse
    assert out["separated"] == ["bft-close", "aligned", "diag"] and out["point"] == ["bft-close", "aligned", "diag"]
    missing = pareto([{"method": "qi", "label": "n", "asr": {}}], "perplexity", "harm", 4)
    assert missing["skipped"] == ["n"] and missing["point"] == []


def test_cluster_interval_resamples_prompts_not_rows():
    from bft.pipelines.reproduce.frontier import cluster_interval

    # 10 prompts x 3 seeds: every seed of a prompt agrees, so the rows are 10 independent units, not 30
    values = [float(i < 5) for i in range(10) for _ in range(3)]
    clusters = [i for i in range(10) for _ in range(3)]
    est, (lo, hi) = cluster_interval(values, clusters)
    est_rows, (lo_rows, hi_rows) = cluster_interval(values, list(range(30)))
    assert est == est_rows == 0.5
    assert hi - lo > 1.3 * (hi_rows - lo_rows)
    assert cluster_interval([1.0, 1.0], ["a", "a"]) == (1.0, [1.0, 1.0])
    assert cluster_interval([], []) == (None, None)


def test_an_asr_of_zero_keeps_an_interval_and_cannot_dominate_beyond_it(tmp_path):
    from bft.eval.stats import wilson_interval
    from bft.pipelines.reproduce.frontier import dominates, point_measures

    cfg = _tiny_config("unused", tmp_path, **FRONTIER)
    judge = cfg.judges[0]

    def evaluation(successes: int, prompts: int, seeds: int) -> dict:
        records = [
            {"k": 2, "prompt": f"p{i}", "judgements": {judge: i < successes}}
            for i in range(prompts)
            for _ in range(seeds)
        ]
        return {"records": records, "likelihood": [], "benign": [], "overrefusal": None}

    zero = point_measures(cfg, [evaluation(0, 64, 1)])["asr"]["2"][judge]
    assert zero["asr"] == 0 and zero["ci"][0] == 0
    assert zero["ci"][1] == pytest.approx(wilson_interval(0, 64)[1]) and zero["ci"][1] > 0.05  # not [0, 0]
    # 0 of 64 prompts against 2 of 200 prompts x 3 seeds (every seed of a prompt agrees): the intervals overlap, so
    # the zero point dominates by its estimate only, not beyond the intervals
    some = point_measures(cfg, [evaluation(2, 200, 3)])["asr"]["2"][judge]
    assert some["ci"][0] < zero["ci"][1]
    better_utility = ((5.0, [4.0, 6.0]), (6.0, [5.0, 7.0]))
    p, q = ((zero["asr"], zero["ci"]), better_utility[0]), ((some["asr"], some["ci"]), better_utility[1])
    assert dominates(p, q, separated=False) and not dominates(p, q, separated=True)


def _benign_rows(prompts, scale):
    # prompt i has a log-prob per token of -(1 + i) * scale over 10 tokens: prompts differ far more than models do
    return [{"prompt": f"b{i}", "sum": -10.0 * (1 + i) * scale, "tokens": 10} for i in range(prompts)]


def test_perplexity_is_compared_paired_over_the_same_benign_prompts(tmp_path):
    from bft.pipelines.reproduce.frontier import dominates, paired_log_ratio, point_axis, point_measures, prompt_key

    cfg = _tiny_config("unused", tmp_path, **FRONTIER)
    judge = cfg.judges[0]

    def point(scale, asr_successes=10):
        records = [{"k": 2, "prompt": f"p{i}", "judgements": {judge: i < asr_successes}} for i in range(64)]
        return point_measures(cfg, [{"records": records, "likelihood": [], "benign": _benign_rows(16, scale)}])

    better, worse = point(0.95), point(1.0)  # 5% lower log-loss on every single prompt
    # unpaired, the prompts' spread swamps the difference: the two perplexity intervals overlap
    assert better["perplexity"]["ci"][1] > worse["perplexity"]["ci"][0]
    # paired over the same prompts, the difference is the same on every prompt: separated
    est, (lo, hi) = paired_log_ratio(
        point_axis(better, "perplexity", judge, 2)[2], point_axis(worse, "perplexity", judge, 2)[2]
    )
    assert hi < 0 and est == pytest.approx(-0.05 * sum(range(1, 17)) / 16)
    p = [point_axis(better, "asr", judge, 2), point_axis(better, "perplexity", judge, 2)]
    q = [point_axis(worse, "asr", judge, 2), point_axis(worse, "perplexity", judge, 2)]
    assert dominates(p, q, separated=True)
    # without the per-prompt rows (an older summary) the disjoint-interval rule decides: not separated
    assert not dominates([a[:2] for a in p], [a[:2] for a in q], separated=True)
    # per-prompt sums are keyed by a short hash and pool the training seeds of a prompt
    pooled = point_measures(cfg, [{"records": [], "likelihood": [], "benign": _benign_rows(2, 1.0)}] * 2)
    assert pooled["perplexity"]["per_prompt"][prompt_key("b1")] == [-40.0, 20]  # -20 over 10 tokens, twice
    # a difference that flips sign from prompt to prompt is not separated
    noisy = [dict(r, sum=r["sum"] * (0.9 if i % 2 else 1.1)) for i, r in enumerate(_benign_rows(16, 1.0))]
    mixed = point_measures(cfg, [{"records": [], "likelihood": [], "benign": noisy}])
    assert (
        paired_log_ratio(point_axis(mixed, "perplexity", judge, 2)[2], point_axis(worse, "perplexity", judge, 2)[2])[1][
            1
        ]
        > 0
    )
    assert paired_log_ratio((("a", -1.0, 1),), (("b", -1.0, 1),)) is None  # no shared prompt


def test_over_refusal_pools_the_training_seeds_by_prompt(tmp_path):
    from bft.eval.stats import cluster_wilson_bound, cluster_wilson_interval, wilson_interval
    from bft.pipelines.reproduce.frontier import _overrefusal_interval_text, _overrefusal_of, point_measures

    cfg = _tiny_config("unused", tmp_path, **FRONTIER)

    def seed_result(refused_ids):
        # what the runner stores: the safe prompts' rows and one harmful contrast row, which must not count
        records = [{"id": f"s{i}", "expected": "comply", "refused": i in refused_ids} for i in range(20)]
        records.append({"id": "h0", "expected": "refuse", "refused": True})
        rate = len(refused_ids) / 20
        return {"utility": {"overrefusal": {"rate": rate, "n": 20, "interval": [0.0, 1.0], "records": records}}}

    first, second = _overrefusal_of(seed_result({0, 1, 2, 3})), _overrefusal_of(seed_result(set(range(12))))
    assert len(first["rows"]) == 20 and ["h0", True] not in first["rows"]
    one = point_measures(cfg, [{"records": [], "likelihood": [], "benign": [], "overrefusal": first}])
    assert one["overrefusal"] == {"value": 0.2, "ci": list(wilson_interval(4, 20)), "n": 20, "method": "wilson"}
    evals = [{"records": [], "likelihood": [], "benign": [], "overrefusal": r} for r in (first, second)]
    both = point_measures(cfg, evals)["overrefusal"]
    ids = [f"s{i}" for i in range(20)] * 2
    truth = cluster_wilson_interval([i < 4 for i in range(20)] + [i < 12 for i in range(20)], ids)
    # 16 of 40 responses, clustered by prompt (the ASR's interval)
    assert both == {"value": 0.4, "ci": truth["ci"], "n": 20, "method": "cluster_wilson"}
    assert truth["design_effect"] > 1
    # every response refuses: the interval stays the Wilson one at the number of prompts, not [1, 1]
    always = _overrefusal_of(seed_result(set(range(20))))
    evals_all = [{"records": [], "likelihood": [], "benign": [], "overrefusal": always}] * 2
    assert point_measures(cfg, evals_all)["overrefusal"]["ci"] == pytest.approx(list(wilson_interval(20, 20)))
    # a stored result without its rows: the mean rate (the pooled rate exactly) and the widest interval pooling by
    # prompt could give, which contains the pooled interval of the rows it lost
    bare = [dict(e, overrefusal=dict(e["overrefusal"], rows=None, interval=[0.1, 0.6])) for e in evals]
    bounded = point_measures(cfg, bare)["overrefusal"]
    assert bounded == {"value": pytest.approx(0.4), "ci": cluster_wilson_bound(0.4, 20), "n": 20, "method": "bound"}
    assert bounded["ci"][0] <= both["ci"][0] and both["ci"][1] <= bounded["ci"][1]
    one_prompt = [dict(e, overrefusal=dict(e["overrefusal"], rows=None, n=1, rate=1.0)) for e in evals]
    assert point_measures(cfg, one_prompt)["overrefusal"]["ci"] is None  # no interval over a single prompt
    # the rendered table says which the pooled points carry (older summaries store no method: a span)
    for measure, words in ((both, "as ASR"), (bounded, "prompts - 1"), ({"value": 0.4}, "span")):
        fr = {"analogs": {"a": {"points": [{"training_seeds": [0, 1], "overrefusal": measure}]}}}
        assert words in _overrefusal_interval_text(fr)


def test_a_degenerate_checkpoint_cannot_win_on_over_refusal_when_both_utilities_count():
    from bft.pipelines.reproduce.frontier import UTILITIES, UTILITY_NAMES, beyond_qi, pareto

    def pt(method, asr, ppl, refusal, label):
        return dict(_pt(method, asr, ppl, label=label), overrefusal={"value": refusal, "ci": None})

    aligned = pt("aligned", 0.10, 6.0, 1.0, "aligned")
    broken_qi = pt("qi", 0.0, 500.0, 0.2, "qi@1")  # its answers have come apart: nothing reads as a refusal
    bft = pt("bft_eq9", 0.02, 8.0, 1.0, "bft_eq9@1")
    points = [aligned, broken_qi, bft]
    assert pareto(points, "overrefusal", "harm", 4)["dominated_by"]["bft_eq9@1"]["point"] == ["qi@1"]
    joint = pareto(points, "perplexity+overrefusal", "harm", 4)
    assert joint["dominated_by"]["bft_eq9@1"]["point"] == [] and "bft_eq9@1" in joint["point"]
    assert beyond_qi(points, "perplexity+overrefusal", "harm", 4)["point"] == ["bft_eq9@1"]
    assert set(UTILITY_NAMES) == set(UTILITIES)
    # a point without over-refusal cannot be placed on the joint axes
    assert "x" in pareto([_pt("qi", 0.1, 5.0, label="x")], "perplexity+overrefusal", "harm", 4)["skipped"]


def test_checkpoint_steps():
    from bft.pipelines.reproduce.frontier import checkpoint_steps

    assert checkpoint_steps([0.0625, 0.125, 0.25, 0.5, 1.0], 394) == [25, 50, 99, 197, 394]
    assert checkpoint_steps([0.25, 0.5, 1.0], 4) == [1, 2, 4]
    assert checkpoint_steps([0.01, 1.0], 3) == [1, 3]  # at least one step, once each


def test_every_method_gets_the_students_budget(tmp_path):
    from bft.pipelines.reproduce.frontier import budget_steps

    cfg = _tiny_config("unused", tmp_path, bft_steps=8, qi_steps=2)  # qi_steps sizes the main pipeline's Qi row only
    assert {m: budget_steps(cfg, {"harmful_train": []}, m) for m in ("qi", "bft_eq9")} == {"qi": 8, "bft_eq9": 8}
    epochs = dataclasses.replace(cfg, bft_epochs=2.0, bft_batch_size=5, harmful_ratio=0.4)  # 2 harmful pairs a step
    assert budget_steps(epochs, {"harmful_train": [{}] * 10}, "qi") == 10


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "key, value",
    [
        ("frontier_fractions", []),
        ("frontier_fractions", [0.5]),  # no full budget
        ("frontier_fractions", [0.0, 1.0]),
        ("frontier_fractions", [1.5, 1.0]),
        ("frontier_qi_fractions", [0.5]),
        ("frontier_qi_fractions", []),
        ("frontier_seeds", []),
        ("frontier_seeds", [0, 0]),
        ("frontier_seeds", ["a"]),
        ("frontier_prompts", 0),
        ("frontier_eval_seeds", 0),
        ("frontier_curve_seeds", 0),
        ("frontier_test_prompts", 0),
        ("frontier_ks", [3]),  # without sweep_k
        ("frontier_ks", [2, 0]),
        ("frontier_methods", ["qi", "dpo"]),
        ("frontier_methods", []),
        ("frontier_analogs", ["medium"]),
        ("frontier_variant", {"completion": "nope"}),
        ("frontier_overrefusal_limit", 0),
        ("frontier_benign_prompts", 0),
        ("frontier_benign_prompts", 2.5),
        ("frontier_diagnostic", ["shallow"]),
        ("frontier_diagnostic", ["shallow", "shallow"]),
        ("frontier_diagnostic", ["deep", "shallow"]),  # the student analog must be on the frontier
        ("frontier_diagnostic", ["shallow", "medium"]),
    ],
)
def test_bad_frontier_values_are_refused_naming_their_key(key, value, tmp_path):
    from bft.pipelines.reproduce import validate

    cfg = _tiny_config("unused", tmp_path, **FRONTIER)
    validate(cfg)
    with pytest.raises(ValueError, match=key):
        validate(dataclasses.replace(cfg, **{key: value}))
    validate(dataclasses.replace(cfg, frontier=False, **{key: value}))  # the frontier off: its keys are not read


def test_the_committed_example_config_loads_and_validates():
    import argparse

    from bft.commands.reproduce import config_from_args

    path = Path(__file__).parents[2] / "docs" / "results" / "frontier" / "config.yaml"
    cfg = config_from_args(argparse.Namespace(config=str(path), out=None))  # as `bft reproduce --config` reads it
    assert cfg.frontier and 1.0 in cfg.frontier_fractions and cfg.frontier_seeds[0] == 0
    assert cfg.eval_tokens > 32 and cfg.frontier_eval_seeds == 3 and cfg.frontier_test_prompts is None


COMMITTED_FRONTIERS = sorted((Path(__file__).parents[2] / "docs" / "results").glob("*/frontier/summary.json"))


@pytest.mark.parametrize("path", COMMITTED_FRONTIERS, ids=lambda p: p.parent.parent.name)
def test_every_committed_frontier_verdict_recomputes_from_its_points(path):
    """README's headline reads the stored ``beyond_qi``: this code, applied to the stored points, gives it again."""
    from bft.pipelines.reproduce.frontier import beyond_qi

    analogs = json.loads(path.read_text())["analogs"]
    assert analogs
    for res in analogs.values():
        for utility, stored in res["beyond_qi"].items():
            assert beyond_qi(res["points"], utility, stored["judge"], stored["k"]) == stored


def test_beyond_qi_names_the_bft_points_that_qis_curve_does_not_dominate():
    from bft.pipelines.reproduce.frontier import beyond_qi, render_frontier

    points = [
        _pt("aligned", 0.02, 1.0, [0.0, 0.05], [0.9, 1.1], label="aligned"),  # not Qi's: ignored here
        _pt("qi", 0.10, 10.0, [0.05, 0.15], [9.0, 11.0], label="qi@1"),
        _pt("qi", 0.40, 6.0, [0.30, 0.50], [5.5, 6.5], label="qi@0.5"),
        _pt("bft_eq9", 0.45, 6.2, [0.35, 0.55], [5.8, 6.6], label="bft_eq9@1"),  # dominated, intervals overlap
        _pt("bft_eq9", 0.60, 8.0, [0.50, 0.70], [7.5, 8.5], label="bft_eq9@0.5"),  # dominated, separated
        _pt("bft_chosen", 0.30, 5.0, [0.20, 0.40], [4.5, 5.5], label="bft_chosen@1"),  # beyond Qi's curve
    ]
    out = beyond_qi(points, "perplexity", "harm", 4)
    assert out["point"] == ["bft_chosen@1"]
    assert out["separated"] == ["bft_eq9@1", "bft_chosen@1"]
    assert out["bft_points"] == 3 and out["qi_points"] == 2
    assert beyond_qi(points[:5], "perplexity", "harm", 4)["point"] == []
    summary = {
        "primary_judge": "harm",
        "ks": [4],
        "seeds": [0],
        "analogs": {
            "deep": {
                "points": points[:5],
                "dominance": {},
                "beyond_qi": {"perplexity": beyond_qi(points[:5], "perplexity", "harm", 4)},
                "plot": "plots/frontier_deep.png",
            }
        },
    }
    text = render_frontier(summary, "docs/results/frontier")
    assert "BFT points that no point of Qi's curve dominates: 0 of 2 by the point estimates; 1 of 2 when" in text
    assert "](docs/results/frontier/plots/frontier_deep.png)" in text


def test_the_headline_verdict_needs_two_training_seeds_and_ten_aligned_successes():
    from bft.pipelines.reproduce.frontier import beyond_qi

    def verdict(points):
        return beyond_qi(points, "perplexity", "harm", 4)["verdict"]

    aligned = _pt("aligned", 0.50, 5.0, [0.45, 0.55], [4.9, 5.1], label="aligned", n=600)  # 300 successes
    qi = _pt("qi", 0.10, 6.0, [0.05, 0.15], [5.8, 6.2], label="qi@1")
    separated = _pt("bft_eq9", 0.40, 7.0, [0.35, 0.45], [6.8, 7.2], label="bft_eq9@1")  # dominated beyond the CIs
    overlapping = _pt("bft_eq9", 0.12, 6.1, [0.06, 0.18], [5.9, 6.3], label="bft_eq9@1")  # dominated within them
    escaping = _pt("bft_eq9", 0.20, 5.5, [0.15, 0.25], [5.3, 5.7], label="bft_eq9@1")  # better perplexity than Qi
    assert verdict([aligned, qi, separated]) == "dominated"
    assert verdict([aligned, qi, overlapping]).startswith("dominated by point estimates only: inconclusive")
    assert verdict([aligned, qi, escaping]) == "not dominated, beyond the intervals"  # perplexity CIs disjoint
    barely = _pt("bft_eq9", 0.20, 5.9, [0.15, 0.25], [5.7, 6.1], label="bft_eq9@1")  # better perplexity, CIs overlap
    assert (
        verdict([aligned, qi, barely]) == "not dominated by the point estimates only: inconclusive within the intervals"
    )
    # escaping Qi's curve beside the aligned model (better perplexity than Qi's, ASR above the aligned model's) is
    # no safety gain: the safer points decide the verdict
    beside = _pt("bft_eq9", 0.55, 5.5, [0.50, 0.60], [5.3, 5.7], label="bft_eq9@0.1", fraction=0.1)
    out = beyond_qi([aligned, qi, beside, separated], "perplexity", "harm", 4)
    assert out["point"] == ["bft_eq9@0.1"] and out["safer_than_aligned"] == ["bft_eq9@1"] and out["escaping"] == []
    assert out["verdict"] == "dominated"
    assert verdict([aligned, qi, beside]) == "no BFT point is safer than the aligned model"
    out = beyond_qi([aligned, qi, escaping], "perplexity", "harm", 4)
    assert out["escaping"] == out["escaping_beyond_intervals"] == out["safer_beyond_intervals"] == ["bft_eq9@1"]
    # escaping Qi's curve beyond the intervals while safer than the aligned model only by the point estimate: the
    # claim beyond the intervals needs both halves
    marginal = _pt("aligned", 0.25, 5.0, [0.20, 0.30], [4.9, 5.1], label="aligned", n=600)
    out = beyond_qi([marginal, qi, escaping], "perplexity", "harm", 4)
    assert out["escaping"] == ["bft_eq9@1"] and out["safer_beyond_intervals"] == []
    assert out["escaping_beyond_intervals"] == []
    assert out["verdict"] == "not dominated by the point estimates only: inconclusive within the intervals"
    one_seed = _pt("bft_eq9", 0.40, 7.0, [0.35, 0.45], [6.8, 7.2], label="bft_eq9@1", seeds=(0,))
    two_seeds = _pt("bft_eq9", 0.40, 7.0, [0.35, 0.45], [6.8, 7.2], label="bft_eq9@1")
    reading = verdict([aligned, qi, two_seeds])
    assert not reading.startswith("inconclusive:")  # no gate: the reading is the verdict
    assert verdict([aligned, qi, one_seed]) == (
        f"inconclusive: one training seed (a headline needs two; the one seed reads: {reading})"
    )
    # an intermediate checkpoint of one seed does not count: only the full-budget points are the headline
    curve = _pt("bft_eq9", 0.45, 7.5, [0.4, 0.5], [7.3, 7.7], label="bft_eq9@0.5", seeds=(0,), fraction=0.5)
    assert verdict([aligned, qi, separated, curve]) == "dominated"
    rare = _pt("aligned", 0.015, 5.0, [0.005, 0.03], [4.9, 5.1], label="aligned", n=600)  # 9 successes
    out = beyond_qi([rare, qi, separated], "perplexity", "harm", 4)
    assert out["aligned_events"] == 9 and out["verdict"].startswith("inconclusive: 9 attack successes")
    assert verdict([aligned, separated]).startswith("inconclusive: no BFT or no Qi point")
