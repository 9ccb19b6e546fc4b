"""The top-level ``kernels/`` folder never stands in for a module named ``kernels``, however Python is started.

``python -m ...``, ``python -c ...`` and ``python script.py`` put the current folder (or the script's folder) first
on ``sys.path``; from the repository root our ``kernels/`` is found there before Hugging Face's ``kernels``
distribution, which transformers imports. Each entry point runs in a subprocess from the repository root.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_KERNELS = ROOT / "kernels" / "__init__.py"

# Which file `import kernels` resolved to, and that bft.kernels is still ours.
PROBE = (
    "import bft.kernels, kernels, pathlib; "
    f"assert pathlib.Path(bft.kernels.__file__).resolve() == pathlib.Path({str(OUR_KERNELS)!r}), bft.kernels.__file__; "
    "print('KERNELS', pathlib.Path(kernels.__file__).resolve())"
)


def _run(args, *, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(env_extra or {})
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _resolved(proc) -> Path:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("KERNELS "))
    return Path(line.split(" ", 1)[1])


@pytest.fixture
def other_kernels(tmp_path):
    """A stand-in ``kernels`` package on PYTHONPATH (no metadata, so transformers never uses it)."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    return tmp_path


def test_python_c_finds_the_other_kernels(other_kernels):
    proc = _run([sys.executable, "-c", PROBE], env_extra={"PYTHONPATH": str(other_kernels)})
    assert _resolved(proc) == other_kernels / "kernels" / "__init__.py"


def test_python_m_pytest_finds_the_other_kernels(other_kernels, tmp_path_factory):
    tests = tmp_path_factory.mktemp("probe")
    (tests / "test_probe.py").write_text(f"def test_probe():\n    exec({PROBE!r})\n")
    proc = _run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tests / "test_probe.py")],
        env_extra={"PYTHONPATH": str(other_kernels)},
    )
    assert _resolved(proc) == other_kernels / "kernels" / "__init__.py"


def test_without_another_kernels_the_import_fails_cleanly():
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('MISSING', e.name)\n"
        "else:\n    print('FOUND', kernels.__file__)\n"
    )
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["MISSING", "kernels"]


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf_kernels = pytest.mark.skipif(
    not _hf_kernels_installed(), reason="Hugging Face's `kernels` is not installed (transformers >= 5.2x brings it)"
)


@needs_hf_kernels
def test_transformers_llama_imports_from_the_root():
    proc = _run([sys.executable, "-c", "import bft, transformers.models.llama.modeling_llama; " + PROBE])
    assert _resolved(proc) != OUR_KERNELS


@needs_hf_kernels
@pytest.mark.parametrize(
    "entry",
    [
        ["-m", "bft", "train", "tiny-cpu", "--max-steps", "1"],
        ["trainer/train.py", "tiny-cpu", "--max-steps", "1"],
        ["accelerate-launch", "trainer/train.py", "tiny-cpu", "--max-steps", "1"],
    ],
    ids=["python -m bft", "python trainer/train.py", "accelerate launch"],
)
def test_entry_points_train_from_the_root(entry, tmp_path):
    if entry[0] == "accelerate-launch":
        accelerate = Path(sys.executable).parent / "accelerate"  # the console script beside this interpreter
        args = [str(accelerate), "launch", "--num_processes", "1", "--cpu", *entry[1:]]
    else:
        args = [sys.executable, *entry]
    proc = _run(args + ["--output-dir", str(tmp_path / "run")], env_extra={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@needs_hf_kernels
def test_benchmark_script_imports_from_the_root():
    # A script puts its own folder first on sys.path, and the benchmarks add it again for their shared helpers.
    proc = _run([sys.executable, "benchmarks/trainer_bench.py", "--help"])
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_a_regular_install_has_only_bft_at_the_top(tmp_path):
    """The wheel (a regular, non-editable install) holds bft with kernels/ and trainer/ under it, never `kernels`."""
    wheels = tmp_path / "wheels"
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    )
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = wheels.glob("bft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"bft"}
    for path in ("bft/kernels/__init__.py", "bft/trainer/__init__.py", "bft/trainer/configs/tiny-cpu.yaml"):
        assert path in names
    # every package of the tree is in the wheel (setup.py finds them; none is listed by hand)
    for init in [
        *ROOT.glob("bft/**/__init__.py"),
        *ROOT.glob("kernels/**/__init__.py"),
        *ROOT.glob("trainer/**/__init__.py"),
    ]:
        relative = init.relative_to(ROOT).as_posix()
        mounted = relative if relative.startswith("bft/") else "bft/" + relative
        assert mounted in names, mounted

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    proc = subprocess.run(
        [sys.executable, "-P", "-c", "import bft.kernels, bft.trainer; print(bft.kernels.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert Path(proc.stdout.strip()).resolve() == (target / "bft" / "kernels" / "__init__.py").resolve()
