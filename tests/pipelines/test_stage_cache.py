"""StageCache: the form in which stage.json and settings.json store settings, and an attempt's record."""

from pathlib import Path

from bft.pipelines.reproduce.stage_cache import StageCache


def test_paths_under_the_run_are_written_relative_to_it_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run whose root is the working folder: "<run>/x" must not become "<run>/<run>/x"
    for root in (tmp_path, Path(".")):
        stages = StageCache(root, log=lambda m: None)
        settings = {
            "model": {"base": str(tmp_path / "models" / "base"), "hub": "HuggingFaceTB/SmolLM2-135M"},
            "paths": [str(tmp_path / "data" / "a.jsonl"), "/elsewhere/b.jsonl"],
            "steps": 4,
        }
        stored = stages.comparable(settings)
        assert stored == {
            "model": {"base": "<run>/models/base", "hub": "HuggingFaceTB/SmolLM2-135M"},
            "paths": ["<run>/data/a.jsonl", "/elsewhere/b.jsonl"],
            "steps": 4,
        }
        assert stages.comparable(stored) == stored


def test_an_attempt_recorded_in_a_run_reads_back_the_same_after_the_run_moves(tmp_path):
    run, moved = tmp_path / "run", tmp_path / "elsewhere" / "run"
    settings = {"model": str(run / "models" / "aligned"), "seed": 1}
    stages = StageCache(run, log=lambda m: None)
    assert stages.attempt_settings("shallow/bft") is None  # never attempted
    stages.dir("shallow/bft").mkdir(parents=True)
    stages.record_attempt("shallow/bft", settings)
    assert stages.attempt_settings("shallow/bft") == {"model": "<run>/models/aligned", "seed": 1}
    moved.parent.mkdir()
    run.rename(moved)
    again = StageCache(moved, log=lambda m: None)
    assert again.attempt_settings("shallow/bft") == again.comparable(
        {"model": str(moved / "models" / "aligned"), "seed": 1}
    )
    assert again.attempt_settings("shallow/bft") != again.comparable(dict(settings, seed=2))
    (moved / "shallow" / "bft" / "settings.json").write_text("{not json")  # an unreadable record is none
    assert again.attempt_settings("shallow/bft") is None
