"""Peak extra host memory of one bft_loss forward+backward, measured in a fresh process (CPU).

    python benchmarks/loss_memory.py --backend torch --N 2048 --H 256 --V 65536

Prints JSON: the peak resident set size during the call minus the resident set size just before it, i.e. the
memory the loss needs beyond its inputs. Linux only (reads /proc/self/status; resets the peak via clear_refs).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bft_inputs  # noqa: E402

import bft  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(backend: str, N: int, H: int, V: int) -> dict:
    tensors, harmful = bft_inputs(N, H, V)
    # warm-up on a tiny problem so one-off allocations (thread pools, kernels) are not counted
    small, small_harm = bft_inputs(4, H, 64)
    bft.bft_loss(*small, harmful=small_harm, backend=backend, top_k=8).loss.backward()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status_kib("VmRSS")
    out = bft.bft_loss(*tensors, harmful=harmful, backend=backend)
    out.loss.backward()
    peak = _status_kib("VmHWM")
    return {"backend": backend, "N": N, "H": H, "V": V, "peak_extra_bytes": (peak - before) * 1024}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, choices=["reference", "torch"])
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--V", type=int, default=65536)
    a = p.parse_args()
    print(json.dumps(measure(a.backend, a.N, a.H, a.V)))
