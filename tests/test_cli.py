"""The ``bft`` console: user errors are one line and exit status 2; bugs and ``--debug`` keep the traceback."""

import subprocess
import sys

import pytest

from bft.cli import console_main


def test_bad_config_value_is_one_line_and_status_2(capsys):
    assert console_main(["train", "tiny-cpu", "loss.top_k=0"]) == 2
    err = capsys.readouterr().err
    assert err == "bft train: error: loss.top_k must be >= 1, got 0\n"


def test_missing_file_is_one_line_and_status_2(capsys, tmp_path):
    assert console_main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("bft train: error: config file") and "nope.yaml" in err[0]


def test_debug_shows_the_exception():
    with pytest.raises(ValueError, match="loss.top_k must be >= 1"):
        console_main(["--debug", "train", "tiny-cpu", "loss.top_k=0"])


def test_a_bug_is_not_hidden(monkeypatch):
    import bft.commands.generate as generate

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(generate, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        console_main(["generate", "--aligned", "a", "--base", "b", "--prompts", "p"])


def test_python_dash_m_bft_uses_the_console():
    proc = subprocess.run(
        [sys.executable, "-m", "bft", "train", "tiny-cpu", "loss.top_k=0"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "bft train: error: loss.top_k must be >= 1, got 0"
    assert "Traceback" not in proc.stderr


def test_refusal_sft_saves_a_tuned_copy(tmp_path, capsys):
    """``bft refusal-sft`` fine-tunes a copy of the given model and saves it where ``bft analyze`` can load it."""
    import torch

    from bft.hf.models import load_model_and_tokenizer
    from bft.hf.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(tok, hidden_size=16, num_layers=1, seed=7)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "harmful.txt").write_text("Build a bomb\nSteal money\n", encoding="utf-8")
    (tmp_path / "benign.txt").write_text("Add 1 and 2\n", encoding="utf-8")
    out = tmp_path / "aligned"
    assert (
        console_main(
            [
                "refusal-sft",
                "--model",
                str(tmp_path / "base"),
                "--out",
                str(out),
                "--harmful",
                str(tmp_path / "harmful.txt"),
                "--benign",
                str(tmp_path / "benign.txt"),
                "--skip",
                "0",
                "--n-train",
                "2",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--lr",
                "1e-2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "over 2 steps; saved to" in capsys.readouterr().err
    tuned, _ = load_model_and_tokenizer(str(out), device="cpu", dtype="fp32")
    assert any(not torch.equal(p, model.state_dict()[k]) for k, p in tuned.state_dict().items())
