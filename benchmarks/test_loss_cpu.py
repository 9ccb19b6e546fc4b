"""CPU benchmark (pytest-benchmark): the torch-chunked backend vs the full-logits reference, side by side.

    python -m pytest benchmarks/test_loss_cpu.py -s

Shape N=2048, H=256, V=65536 (override with BFT_BENCH_N / _H / _V; BFT_BENCH_ROUNDS rounds, default 3). Targets:
peak extra memory ≤ 1/8 and time ≤ 1.5× of the reference, measured in the same run. Each timing round runs both
backends back to back, alternating which goes first, and the time ratio is the median of the per-round ratios: on a
CPU shared with other work, timing one backend's rounds after the other's lets a change of load decide the ratio.
Writes benchmarks/results/loss_cpu.json with the ratios, the device name and the load average.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _common import RESULTS, bft_inputs, device_name, write_json_atomic

import bft

N = int(os.environ.get("BFT_BENCH_N", 2048))
H = int(os.environ.get("BFT_BENCH_H", 256))
V = int(os.environ.get("BFT_BENCH_V", 65536))
BACKENDS = ["reference", "torch"]
ROUNDS = int(os.environ.get("BFT_BENCH_ROUNDS", 3))
_results: dict = {}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if "wall" not in _results:
        return
    wall, cpu, mem = _results["wall"], _results["cpu"], _results.get("peak_extra_bytes", {})
    paired = [t / r for t, r in zip(wall["torch"], wall["reference"])]
    payload = {
        "benchmark": "bft_loss forward+backward, CPU",
        "device": device_name("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"N": N, "H": H, "V": V, "top_k": 100, "dtype": "float32"},
        "rounds": len(paired),
        "method": (
            "each round runs both backends back to back (order alternating between rounds) after one warm-up "
            "round; time ratio = median over rounds of torch/reference wall time in the same round, so that a "
            "shared CPU's changing load hits both alike. Memory: peak RSS minus RSS before the call, each backend "
            "in a fresh process (benchmarks/loss_memory.py)."
        ),
        "seconds_median": {b: _median(wall[b]) for b in BACKENDS},
        "seconds_rounds": wall,
        "cpu_seconds_median": {b: _median(cpu[b]) for b in BACKENDS},
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],  # the CPU may be shared with others
        "peak_extra_bytes": mem,
        "time_ratio_torch_vs_reference": _median(paired),
        "time_ratio_per_round": paired,
        "cpu_time_ratio_torch_vs_reference": _median(cpu["torch"]) / _median(cpu["reference"]),
        "memory_ratio_torch_vs_reference": (mem["torch"] / mem["reference"]) if len(mem) == 2 else None,
        "targets": {"time_ratio_max": 1.5, "memory_ratio_max": 0.125},
    }
    payload["targets_met"] = {
        "time": payload["time_ratio_torch_vs_reference"] <= 1.5,
        "memory": None
        if payload["memory_ratio_torch_vs_reference"] is None
        else payload["memory_ratio_torch_vs_reference"] <= 0.125,
    }
    write_json_atomic(RESULTS / "loss_cpu.json", payload)
    print(json.dumps(payload, indent=2))


def test_loss_forward_backward_time(benchmark):
    """Both backends in every round, back to back, alternating which goes first (paired timing on a shared CPU)."""
    tensors, harmful = bft_inputs(N, H, V)
    wall: dict = {b: [] for b in BACKENDS}
    cpu: dict = {b: [] for b in BACKENDS}
    calls = []

    def one_round():
        order = BACKENDS if len(calls) % 2 == 0 else BACKENDS[::-1]
        calls.append(order)
        for backend in order:
            for t in tensors[:2]:
                t.grad = None
            w0, c0 = time.perf_counter(), time.process_time()
            bft.bft_loss(*tensors, harmful=harmful, backend=backend).loss.backward()
            wall[backend].append(time.perf_counter() - w0)
            cpu[backend].append(time.process_time() - c0)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    skip = 1 if len(calls) > 1 else 0  # pedantic's warm-up round (the only round under --benchmark-disable)
    _results["wall"] = {b: wall[b][skip:] for b in BACKENDS}
    _results["cpu"] = {b: cpu[b][skip:] for b in BACKENDS}
    benchmark.extra_info.update({f"seconds_median_{b}": _median(_results["wall"][b]) for b in BACKENDS})


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_peak_extra_memory(backend):
    script = Path(__file__).resolve().parent / "loss_memory.py"
    cmd = [sys.executable, str(script), "--backend", backend, "--N", str(N), "--H", str(H), "--V", str(V)]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    _results.setdefault("peak_extra_bytes", {})[backend] = res["peak_extra_bytes"]
