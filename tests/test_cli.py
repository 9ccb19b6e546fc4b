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
    proc = subprocess.run([sys.executable, "-m", "bft", "train", "tiny-cpu", "loss.top_k=0"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "bft train: error: loss.top_k must be >= 1, got 0"
    assert "Traceback" not in proc.stderr
