"""GPU benchmark of the BFT loss: forward+backward time and peak extra memory, every implementation side by side.

    python benchmarks/loss_gpu.py                       # N in {1024, 2048, 4096, 8192, 16384}, H=4096, V=128256
    python benchmarks/loss_gpu.py --N 8192 --quick      # one size

Implementations, all in the same run on the same inputs (bf16, Llama-3-shaped head):
  triton          bft.bft_loss(backend="triton")       (cuBLAS fp32-output GEMMs + Triton row kernel)
  triton-gemm     the same with the Triton three-logit GEMM kernel
  triton-ungrouped the driver before dW groups (dH/dW GEMMs after every 256 MiB chunk), for the side-by-side ratio
  torch           bft.bft_loss(backend="torch")        (row-chunked reference math)
  reference       bft.bft_loss(backend="reference")    (full [N, V] logits; OOM is recorded as such)
  compiled-ref    torch.compile of the reference
  liger-jsd       Liger's LigerFusedLinearJSD (student vs aligned only: two models, no top-k) when installed
  floor           the 5 GEMMs any exact implementation must run: 3 logit GEMMs + dH and dW GEMMs (torch.matmul)
  *-frozen-head   the LoRA case (student head frozen and shared): triton without dW, against a 4-GEMM floor
Targets at N=8192: triton ≤ 1.2× the floor, ≤ 1 GiB extra memory (beyond inputs and the gradients themselves).
Writes benchmarks/results/loss_gpu.json (with the device name) and loss_gpu.png.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, bft_inputs, device_name, write_json_atomic  # noqa: E402

import bft  # noqa: E402
from bft.reference import bft_loss_reference  # noqa: E402


def _fresh_inputs(N, H, V, dtype):
    tensors, harmful = bft_inputs(N, H, V, dtype=dtype, device="cuda")
    return tensors, harmful


def make_runners(H, V):
    def fused(backend, **kw):
        def run(tensors, harmful):
            bft.bft_loss(*tensors, harmful=harmful, backend=backend, **kw).loss.backward()

        return run

    def reference(tensors, harmful):
        valid = torch.ones_like(harmful)
        loss, _ = bft_loss_reference(*tensors, harmful=harmful, valid=valid, **_params())
        loss.backward()

    compiled = torch.compile(bft_loss_reference, dynamic=False)

    def compiled_reference(tensors, harmful):
        valid = torch.ones_like(harmful)
        loss, _ = compiled(*tensors, harmful=harmful, valid=valid, **_params())
        loss.backward()

    def floor(tensors, harmful):
        sh, sw, ah, aw, bh, bw = (t.detach() for t in tensors)
        s = sh @ sw.T
        ah @ aw.T  # the aligned and base logit GEMMs
        bh @ bw.T
        g = s  # a [N, V] gradient block of the input dtype
        g @ sw  # dH
        g.T @ sh  # dW

    def frozen_head(run):
        """The LoRA case: the student's head is frozen (shared with the aligned model), so only dH is computed."""

        def wrapped(tensors, harmful):
            tensors[1].requires_grad_(False)
            try:
                run(tensors, harmful)
            finally:
                tensors[1].requires_grad_(True)

        return wrapped

    def floor_frozen_head(tensors, harmful):
        sh, sw, ah, aw, bh, bw = (t.detach() for t in tensors)
        s = sh @ sw.T
        ah @ aw.T
        bh @ bw.T
        s @ sw  # dH only: 4 GEMMs

    runners = {
        "triton": fused("triton"),
        "triton-frozen-head": frozen_head(fused("triton")),
        "floor-frozen-head": floor_frozen_head,
        "triton-gemm": _triton_gemm_runner(),
        # the driver as measured before dW groups: 256 MiB blocks, dH/dW GEMMs after every chunk
        "triton-ungrouped": _driver_variant(DEFAULT_BLOCK_BYTES_WITH_DW=256 * 2**20, DEFAULT_GROUP_BYTES=0),
        "torch": fused("torch"),
        "reference": reference,
        "compiled-ref": compiled_reference,
        "floor": floor,
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=2.0)  # β=0: forward KL(teacher ‖ student)

        def liger(tensors, harmful):
            sh, sw, ah, aw = tensors[:4]
            jsd(sh, sw, ah, aw).backward()

        runners["liger-jsd"] = liger
    except ImportError:
        pass
    return runners


def _params():
    return dict(top_k=100, temperature=2.0, teacher_lambda=1.2, alpha_base=1.0, gamma=1.0, l2_reg=1e-4, kl="forward")


def _driver_variant(**settings):
    """bft_loss(backend="triton") with module-level budgets of bft.kernels.bft_loss set as given for the call."""
    import bft.kernels.bft_loss as driver

    def run(tensors, harmful):
        saved = {k: getattr(driver, k) for k in settings}
        for k, v in settings.items():
            setattr(driver, k, v)
        try:
            bft.bft_loss(*tensors, harmful=harmful, backend="triton").loss.backward()
        finally:
            for k, v in saved.items():
                setattr(driver, k, v)

    return run


def _triton_gemm_runner():
    from bft.kernels import bft_logits

    def run(tensors, harmful):
        original = bft_logits.three_logits

        def forced(*args, **kwargs):
            kwargs["gemm"] = "triton"
            return original(*args, **kwargs)

        import bft.kernels.bft_loss as driver

        driver.three_logits = forced
        try:
            bft.bft_loss(*tensors, harmful=harmful, backend="triton").loss.backward()
        finally:
            driver.three_logits = original

    return run


def measure(run, N, H, V, dtype, repeats):
    tensors, harmful = _fresh_inputs(N, H, V, dtype)
    try:
        run(tensors, harmful)  # warm-up / compile
        for t in tensors[:2]:
            t.grad = None
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            for t in tensors[:2]:
                t.grad = None
            start.record()
            run(tensors, harmful)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        grads = sum(t.grad.numel() * t.grad.element_size() for t in tensors[:2] if t.grad is not None)
        peak_extra = torch.cuda.max_memory_allocated() - base - grads
        return {"seconds": sorted(times)[len(times) // 2], "peak_extra_bytes": int(peak_extra)}
    except torch.OutOfMemoryError:
        return {"seconds": None, "peak_extra_bytes": None, "error": "OOM"}
    finally:
        del tensors
        gc.collect()
        torch.cuda.empty_cache()


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in payload["implementations"]:
        pts = [(r["N"], r[impl]) for r in payload["rows"] if r.get(impl, {}).get("seconds")]
        if not pts:
            continue
        ax_t.plot([n for n, _ in pts], [m["seconds"] * 1e3 for _, m in pts], marker="o", label=impl)
        if impl != "floor":
            ax_m.plot([n for n, _ in pts], [m["peak_extra_bytes"] / 2**30 for _, m in pts], marker="o", label=impl)
    for ax, label in ((ax_t, "forward+backward (ms)"), (ax_m, "peak extra memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (token positions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"BFT loss, H={payload['shape']['H']}, V={payload['shape']['V']}, bf16 — {payload['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", help="implementations to run (default: all)")
    p.add_argument("--skip-slow-above", type=int, default=4096,
                   help="run reference/compiled-ref/torch only up to this N (they are slow or OOM)")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "loss_gpu.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("loss_gpu.py needs a CUDA GPU; on CPU run benchmarks/test_loss_cpu.py")
    dtype = torch.bfloat16
    runners = make_runners(a.H, a.V)
    if a.only:
        runners = {k: v for k, v in runners.items() if k in a.only}
    from tqdm import tqdm

    rows = []
    for N in tqdm(a.N, desc="N"):
        row = {"N": N}
        for name, run in runners.items():
            if name in ("reference", "compiled-ref", "torch") and N > a.skip_slow_above:
                continue
            row[name] = measure(run, N, a.H, a.V, dtype, a.repeats)
        if row.get("floor", {}).get("seconds"):
            fl = row["floor"]["seconds"]
            row["ratio_to_floor"] = {k: v["seconds"] / fl for k, v in row.items()
                                     if isinstance(v, dict) and v.get("seconds") and "frozen-head" not in k}  # fmt: skip
        if row.get("floor-frozen-head", {}).get("seconds") and row.get("triton-frozen-head", {}).get("seconds"):
            row.setdefault("ratio_to_floor", {})["triton-frozen-head"] = (row["triton-frozen-head"]["seconds"]
                                                           / row["floor-frozen-head"]["seconds"])  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    payload = {
        "benchmark": "bft_loss forward+backward",
        "device": device_name("cuda"),
        "torch": torch.__version__,
        "shape": {"H": a.H, "V": a.V, "dtype": "bfloat16", "top_k": 100},
        "implementations": list(runners),
        "targets": {"N": 8192, "ratio_to_floor_max": 1.2, "peak_extra_bytes_max": 2**30},
        "rows": rows,
    }
    write_json_atomic(a.out, payload)
    plot(payload, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
