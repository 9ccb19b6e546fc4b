"""StageCache.comparable: the form in which stage.json and settings.json store settings."""

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
