"""bft's KL term against TRL's chunked divergence (TRL's DistillationTrainer loss), side by side in one run.

    python benchmarks/trl_peer.py --threads 1               # CPU, three CPU-sized shapes, ~1-2 min
    python benchmarks/trl_peer.py --device cuda             # GPU: bf16, H=4096, V=128256, N in {2048, 8192}
    TRITON_INTERPRET=1 python benchmarks/trl_peer.py --tiny --out /tmp/x.json   # dry run (every path, tiny)

Where the objectives coincide (tests/benchmarks/test_trl_peer.py checks the map on tiny fp32 shapes): bft's loss with no
completion term (l2_reg = 0) and TRL's forward KL (beta = 0) with the hybrid teacher t = λ·a + (1 − λ)·b given to
TRL as ONE head on concatenated hidden states, [h_a | h_b]·[λ·W_a | (1 − λ)·W_b]ᵀ, and TRL's mean times τ² (bft
scales the KL by τ², TRL does not). Rows, each one forward + backward on the same inputs:

  bft-torch        bft.bft_loss(backend="torch", l2_reg=0)
  bft-triton       bft.bft_loss(backend="triton", l2_reg=0) (CUDA; on the CPU only in --tiny, under the interpreter)
  bft-torch-full   backend="torch" with the completion term on (l2_reg=1e-4, top-k 100, 40 % harmful rows): what the
                   whole objective costs over its KL (not compared for correctness)
  bft-triton-full  the same with backend="triton" (CUDA)
  trl-chunked      trl.kernels.chunked_divergence.ChunkedDivergenceFunction, beta=0, temperature τ, on the
                   concatenated teacher head (built once per shape, untimed, counted as an input), τ²·mean
  naive            plain torch on full [N, V] fp32 logits of all three models (autograd; OOM is recorded)

Before timing, every compared row's loss and gradients (dH, dW of the student) are checked against naive's, fp32
relative tolerance 1e-4 (bf16 inputs: 2e-2, the concatenated head's λ·W is rounded to bf16); a row that fails the
check is recorded with status "mismatch" and not timed. Timing interleaves the rows (one call of each per round, the
order rotated each round) and reports the median. Peak memory beyond the inputs and the gradients: on CUDA
max_memory_allocated; on the CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
call, with glibc's mmap threshold fixed at 1 MiB (the script re-executes itself with MALLOC_MMAP_THRESHOLD_) so that
freed blocks go back to the system and one row's freed memory does not hide the next one's.

Writes JSON (--out, default benchmarks/results/trl_peer_<device type>.json) with the device name and versions.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import RESULTS, bft_inputs, device_name, write_json_atomic

import bft

TAU, LAM, TOP_K = 2.0, 1.2, 100
CPU_SHAPES = [(128, 128, 16384), (512, 128, 16384), (256, 128, 32768)]  # (N, H, V): a shared 2-core CPU
GPU_SHAPES = [(2048, 4096, 128256), (8192, 4096, 128256)]
TINY_SHAPES = [(8, 16, 128), (24, 16, 300)]
ORDER = ["bft-torch", "bft-triton", "trl-chunked", "naive", "bft-torch-full", "bft-triton-full"]
COMPARED = ("bft-torch", "bft-triton", "trl-chunked")  # same objective as naive


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Case:
    """One shape's inputs: the three models' hidden states and heads, the harmful rows, TRL's concatenated head."""

    def __init__(self, N, H, V, dtype, device, top_k):
        (self.sh, self.sw, self.ah, self.aw, self.bh, self.bw), self.harmful = bft_inputs(
            N, H, V, dtype=dtype, device=device, generator_device=device if device.type == "cuda" else "cpu"
        )
        self.top_k = min(top_k, V)
        self._teacher = None

    def teacher(self):
        """[h_a | h_b] and [λ·W_a | (1 − λ)·W_b]: the hybrid teacher as one head (made once, untimed)."""
        if self._teacher is None:
            with torch.no_grad():
                self._teacher = (torch.cat([self.ah, self.bh], 1), torch.cat([LAM * self.aw, (1 - LAM) * self.bw], 1))
        return self._teacher

    def clear_grads(self):
        self.sh.grad = self.sw.grad = None

    def input_bytes(self):
        return sum(t.numel() * t.element_size() for t in (self.sh, self.sw, self.ah, self.aw, self.bh, self.bw))


def _bft(backend, full=False):
    def run(c: Case):
        kw = {"l2_reg": 1e-4} if full else {"l2_reg": 0.0}
        out = bft.bft_loss(
            c.sh,
            c.sw,
            c.ah,
            c.aw,
            c.bh,
            c.bw,
            harmful=c.harmful,
            top_k=c.top_k,
            temperature=TAU,
            teacher_lambda=LAM,
            backend=backend,
            **kw,
        )
        out.loss.backward()
        return out.loss.detach()

    return run


def _trl(c: Case):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    th, tw = c.teacher()
    div, _ = ChunkedDivergenceFunction.apply(c.sh, c.sw, None, th, tw, None, 0.0, TAU)
    loss = TAU**2 * div.mean()  # TRL's mean over valid rows; bft's KL carries τ²
    loss.backward()
    return loss.detach()


def _naive(c: Case):
    f = torch.float32
    s = c.sh.to(f) @ c.sw.to(f).T
    with torch.no_grad():
        t = LAM * (c.ah.to(f) @ c.aw.to(f).T) + (1 - LAM) * (c.bh.to(f) @ c.bw.to(f).T)
        log_pt = torch.log_softmax(t / TAU, -1)
    kl = (log_pt.exp() * (log_pt - torch.log_softmax(s / TAU, -1))).sum(-1)
    loss = TAU**2 * kl.mean()
    loss.backward()
    return loss.detach()


def make_rows(device, tiny):
    cuda = device.type == "cuda"
    triton_ok = cuda or (tiny and os.environ.get("TRITON_INTERPRET") == "1")
    rows = {
        "bft-torch": _bft("torch"),
        "bft-triton": _bft("triton"),
        "trl-chunked": _trl,
        "naive": _naive,
        "bft-torch-full": _bft("torch", full=True),
        "bft-triton-full": _bft("triton", full=True),
    }
    status = {}
    if not triton_ok:
        for n in ("bft-triton", "bft-triton-full"):
            status[n] = "skipped: CUDA only (on the CPU Triton runs only under the interpreter: --tiny)"
    if _version("trl") is None:
        status["trl-chunked"] = "not installed: trl"
    return rows, status


# -------------------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _grads(c):
    return c.sh.grad.detach().float().clone(), c.sw.grad.detach().float().clone()


def _rel(x, y):
    return float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30))


def check(rows, names, c: Case, rtol) -> dict:
    """Loss and student gradients of every compared row against naive's. Returns {name: check dict}."""
    out = {}
    c.clear_grads()
    ref_loss = _naive(c)
    ref_gh, ref_gw = _grads(c)
    for name in names:
        c.clear_grads()
        loss = rows[name](c)
        gh, gw = _grads(c)
        d = {
            "loss": float(loss),
            "naive_loss": float(ref_loss),
            "loss_rel": abs(float(loss - ref_loss)) / abs(float(ref_loss)),
            "dH_rel": _rel(gh, ref_gh),
            "dW_rel": _rel(gw, ref_gw),
            "rtol": rtol,
        }
        d["agree"] = max(d["loss_rel"], d["dH_rel"], d["dW_rel"]) <= rtol
        out[name] = d
    c.clear_grads()
    return out


def peak_memory(run, c: Case, device) -> int | None:
    """Peak bytes one forward+backward holds beyond the inputs and the student's gradients."""
    c.clear_grads()
    gc.collect()
    grads = c.sh.numel() * c.sh.element_size() + c.sw.numel() * c.sw.element_size()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(c)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _kib("VmRSS")
        except OSError:
            return None
        run(c)
        peak = (_kib("VmHWM") - before) * 1024
    c.clear_grads()
    return int(peak - grads)


def bench_shape(shape, args, device, dtype, rows, status) -> dict:
    N, H, V = shape
    c = Case(N, H, V, dtype, device, args.top_k)
    result = {"N": N, "H": H, "V": V, "input_bytes": c.input_bytes(), "impls": {}}
    impls = result["impls"]
    live = []
    for name in ORDER:
        if name in status:
            s, _, reason = status[name].partition(": ")
            impls[name] = {"status": s, "reason": reason}
        else:
            live.append(name)
    if "trl-chunked" in live:
        c.teacher()
        result["teacher_head_bytes"] = sum(t.numel() * t.element_size() for t in c.teacher())
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    try:  # warm-up (Triton autotuning, lazy imports) and the correctness check, before any timing
        checks = check(rows, [n for n in COMPARED if n in live], c, rtol)
    except torch.OutOfMemoryError:  # naive did not fit: check the chunked rows against bft-torch instead
        checks = {}
        result["check_note"] = "naive OOM: not checked"
    for name in live:
        impls[name] = {"status": "ok"}
        if name in checks:
            impls[name]["check"] = checks[name]
            if not checks[name]["agree"]:
                impls[name].update(status="mismatch", reason=f"differs from naive beyond rtol {rtol}")
    timed = [n for n in live if impls[n]["status"] == "ok"]
    for name in timed:  # warm-up of the rows not checked (full objective); OOM recorded
        try:
            c.clear_grads()
            rows[name](c)
        except torch.OutOfMemoryError:
            impls[name].update(status="OOM", reason="torch.OutOfMemoryError")
        except Exception as e:  # noqa: BLE001  (a row that fails is recorded; the others still run)
            impls[name].update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            c.clear_grads()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    timed = [n for n in timed if impls[n]["status"] == "ok"]
    times = {n: [] for n in timed}
    for r in range(args.repeats):  # interleaved: one call of each row per round, the order rotated every round
        k = r % max(1, len(timed))
        for name in timed[k:] + timed[:k]:
            c.clear_grads()
            _sync(device)
            t0 = time.perf_counter()
            rows[name](c)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    c.clear_grads()
    for name in timed:
        impls[name]["seconds"] = statistics.median(times[name])
        impls[name]["seconds_all"] = times[name]
        try:
            impls[name]["peak_extra_bytes"] = peak_memory(rows[name], c, device)
        except torch.OutOfMemoryError:
            impls[name]["peak_extra_bytes"] = None
    base = impls.get("bft-torch", {}).get("seconds")
    result["time_ratio_to_bft_torch"] = {n: impls[n]["seconds"] / base for n in timed if base}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=None, help="N,H,V triples (default: by device)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3 CPU, 5 CUDA, 1 --tiny)")
    p.add_argument("--top-k", type=int, default=TOP_K)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    p.add_argument("--tiny", action="store_true", help="dry run: tiny shapes, fp32, 1 round")
    p.add_argument("--no-reexec", action="store_true", help="keep glibc's malloc settings (CPU memory less exact)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if args.tiny:
        shapes, dtype, args.top_k = TINY_SHAPES, torch.float32, 4
    else:
        shapes = GPU_SHAPES if cuda else CPU_SHAPES
        dtype = torch.bfloat16 if cuda else torch.float32
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    if args.repeats is None:
        args.repeats = 1 if args.tiny else (5 if cuda else 3)
    out_path = args.out or RESULTS / f"trl_peer_{device.type}.json"
    rows, status = make_rows(device, args.tiny)
    payload = {
        "what": "bft KL-only (l2_reg = 0) vs TRL's chunked divergence (beta = 0, hybrid teacher as one concatenated "
        "head, τ²·mean) vs naive full logits; bft-*-full rows add the completion term (not compared)",
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if not cuda else None,
        "repeats": args.repeats,
        "dry_run": args.tiny,
        "settings": {
            "temperature": TAU,
            "teacher_lambda": LAM,
            "top_k_full": args.top_k,
            "l2_reg_full": 1e-4,
            "trl_beta": 0.0,
            "trl_loss": "τ² · mean(per-token divergence)",
        },
        "versions": {
            "torch": torch.__version__,
            "trl": _version("trl"),
            "triton": _version("triton"),
            "bft": _version("bft"),
        },
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "shapes": [],
    }
    for shape in shapes:
        print(f"shape N,H,V = {shape} ({payload['dtype']}, {payload['device']})", flush=True)
        res = bench_shape(shape, args, device, dtype, rows, status)
        payload["shapes"].append(res)
        for name, m in res["impls"].items():
            chk = m.get("check")
            agree = (
                ""
                if chk is None
                else f"  check loss {chk['loss_rel']:.1e} dH {chk['dH_rel']:.1e} dW {chk['dW_rel']:.1e}"
            )
            if m.get("seconds") is not None:
                mem = m.get("peak_extra_bytes")
                mem_s = "n/a" if mem is None else f"{mem / 2**20:8.1f} MiB"
                print(f"  {name:16s} {m['seconds'] * 1e3:9.1f} ms  peak extra {mem_s}{agree}", flush=True)
            else:
                print(f"  {name:16s} {m['status']}: {m.get('reason', '')}{agree}", flush=True)
        write_json_atomic(out_path, payload)  # after every shape: a cut run keeps what it measured
    print(f"wrote {out_path}")
    return payload


if __name__ == "__main__":
    if (
        sys.platform.startswith("linux")
        and "MALLOC_MMAP_THRESHOLD_" not in os.environ
        and "--no-reexec" not in sys.argv
    ):
        # freed large blocks go back to the system, so one call's RSS peak is not hidden by an earlier call's frees
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
