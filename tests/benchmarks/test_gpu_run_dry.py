"""Dry runs of the prepared GPU run on the CPU: benchmarks/loss_gpu.py --device cpu --tiny (every row present, or
recorded with the reason it did not run; the Liger-schema CSV and the plot written) and the control flow of
benchmarks/gpu_run.sh (GPU_RUN_DRY=stub: each step's files land under $OUT, at most 8 files, a failing step does not
stop the others, an exhausted budget skips the steps and says so). What only a GPU can check stays for the GPU run.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_gpu():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("loss_gpu_dry", BENCH / "loss_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the dry run's triton rows need the interpreter")
def test_loss_gpu_tiny_dry_run_has_every_row(tmp_path):
    loss_gpu = _loss_gpu()
    out = tmp_path / "x.json"
    loss_gpu.main(["--device", "cpu", "--tiny", "--N", "4", "--out", str(out)])
    payload = json.loads(out.read_text())
    names = list(payload["implementations"])
    assert names == loss_gpu.ORDER
    assert {
        "triton",
        "triton-given",
        "compiled-torch",
        "liger-chunked-jsd",
        "liger-jsd",
        "cce",
        "floor-liger",
        "floor-cce",
        "floor",
    } <= set(names)
    assert payload["dry_run"] and payload["device_type"] == "cpu" and payload["shape"]["top_k"] == 4
    (row,) = payload["rows"]
    for name in names:
        m = row[name]
        if m["status"] == "ok":
            assert m["seconds"] > 0
        else:  # not installed / CUDA only: the reason is recorded
            assert m["status"] in ("not installed", "skipped") and m["reason"], (name, m)
    # everything that is not a CUDA-only or missing package ran on the CPU
    for name in (
        "triton",
        "triton-given",
        "triton-frozen-head",
        "triton-given-frozen-head",
        "triton-gemm",
        "triton-ungrouped",
        "torch",
        "compiled-torch",
        "reference",
        "compiled-ref",
        "floor",
        "floor-frozen-head",
        "floor-liger",
        "floor-cce",
        "floor-cce-frozen-head",
    ):
        assert row[name]["status"] == "ok", (name, row[name])
    assert row["liger-jsd"]["status"] in ("not installed", "skipped")  # Triton kernels: CUDA only
    assert row["cce"]["status"] in ("not installed", "skipped")
    if importlib.util.find_spec("liger_kernel") is not None:
        assert row["liger-chunked-jsd"]["status"] == "ok"
    assert set(row["ratio_to_floor"]) >= {"triton", "triton-given", "compiled-torch", "triton-frozen-head"}
    assert payload["target_check"] is None  # no N = 8192 row in a dry run

    with out.with_suffix(".csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == loss_gpu.CSV_COLUMNS
        lines = list(reader)
    ran = {n for n in names if row[n]["status"] == "ok"}
    assert {line["kernel_provider"] for line in lines} == ran
    assert {line["metric_name"] for line in lines} == {"speed"}  # memory is not measured on the CPU
    line = next(x for x in lines if x["kernel_provider"] == "triton-given")
    assert line["x_name"] == "BT" and line["x_value"] == "4" and float(line["y_value_50"]) > 0
    assert json.loads(line["extra_benchmark_config_str"])["floor"] == "floor"
    assert out.with_suffix(".png").stat().st_size > 1000


def _gpu_run(tmp_path, **env):
    out, work, wheels = tmp_path / "out", tmp_path / "work", tmp_path / "no-wheels"
    wheels.mkdir(parents=True)
    full = dict(os.environ, OUT=str(out), GPU_RUN_WORK=str(work), GPU_RUN_WHEELS=str(wheels), GPU_RUN_DRY="stub")
    full.update(env)
    cmd = ["bash", str(BENCH / "gpu_run.sh")]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return out, {s["step"]: s for s in steps}, proc.stdout


STEPS = [
    "setup",
    "a-pytest-loss",
    "b-loss-8192",
    "f-trl-peer",
    "c-loss-sweep",
    "d-trainer-lora",
    "d-trainer-lora-8bit",
    "d-trainer-full-adam8bit",
    "e-reproduce-paper",
]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_run_stub_writes_every_step_under_out(tmp_path):
    out, steps, _ = _gpu_run(tmp_path)
    assert list(steps) == STEPS
    for name in STEPS[:-1]:
        assert steps[name]["status"] == "ok", steps[name]
    assert steps["e-reproduce-paper"]["status"] in ("ok", "skipped")  # skipped where the smollm2 model is missing
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8  # what the device tool brings back
    assert {
        "log.txt",
        "steps.jsonl",
        "results.tgz",
        "junit_loss.xml",
        "loss_gpu_8192.json",
        "trl_peer_gpu.json",
        "loss_gpu_sweep.json",
    } <= set(files)
    with tarfile.open(out / "results.tgz") as tar:
        packed = {Path(n).name for n in tar.getnames()}
    assert {
        "trainer_gpu_lora.json",
        "trainer_gpu_lora-8bit.json",
        "trainer_gpu_full-adam8bit.json",
        "loss_gpu_8192.csv",
        "loss_gpu_sweep.csv",
        "steps.jsonl",
    } <= packed
    assert "model.safetensors" not in packed  # weights stay out of what comes back
    assert "=== done" in (out / "log.txt").read_text()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_run_budget_and_failures(tmp_path):
    # an exhausted budget: setup runs, every step is skipped with the reason, the script still ends cleanly
    _, steps, _ = _gpu_run(tmp_path / "spent", GPU_RUN_BUDGET_S="5", GPU_RUN_RESERVE_S="10")
    assert list(steps) == STEPS
    for name in STEPS[1:-1]:
        assert steps[name]["status"] == "skipped" and "budget" in steps[name]["reason"]
    # a failing step (a python that exits 3 for every command) is recorded and the next steps still run
    fake = tmp_path / "fail" / "python3"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    out, steps, _ = _gpu_run(tmp_path / "fail", PYTHON=str(fake))
    assert steps["a-pytest-loss"]["status"] == "failed" and steps["a-pytest-loss"]["rc"] == 3
    assert steps["b-loss-8192"]["status"] == "ok"  # stubs do not use python
    assert steps["e-reproduce-paper"]["status"] == "skipped"  # the model check failed with it
    # a second call on the still-warm machine: only the trainer, one mode
    _, steps, _ = _gpu_run(tmp_path / "again", GPU_RUN_STEPS="d", GPU_RUN_TRAINER_MODES="lora")
    assert [s for s in steps if steps[s]["status"] == "ok"] == ["setup", "d-trainer-lora"]
    for name in ("a-pytest-loss", "b-loss-8192", "f-trl-peer", "c-loss-sweep"):
        assert steps[name]["status"] == "skipped" and "not selected" in steps[name]["reason"]
    assert "d-trainer-lora-8bit" not in steps
