"""GPU benchmark of the BFT loss: forward+backward time and peak extra memory, every implementation side by side.

    python benchmarks/loss_gpu.py                       # N in {1024, 2048, 4096, 8192, 16384}, H=4096, V=128256
    python benchmarks/loss_gpu.py --N 8192              # one size, every row
    python benchmarks/loss_gpu.py --only triton floor   # some rows
    TRITON_INTERPRET=1 python benchmarks/loss_gpu.py --device cpu --tiny --out /tmp/x.json   # dry run on a CPU

Implementations, all in the same run on the same inputs (bf16, Llama-3-shaped head; the row's floor in brackets):
  triton            bft.bft_loss(backend="triton") (cuBLAS fp32-output GEMMs + Triton row kernel)       [floor]
  triton-given      the same with topk_ids= and risk= precomputed (the teacher-cache path); computing them
                    (bft.chunked.base_favored_rows) is outside the timed region and inside the memory baseline [floor]
  triton-gemm       triton with the Triton three-logit GEMM kernel                                       [floor]
  triton-ungrouped  the driver before dW groups (dH/dW GEMMs after every 256 MiB chunk)                  [floor]
  torch             bft.bft_loss(backend="torch") (row-chunked reference math)                           [floor]
  compiled-torch    backend="torch" with its per-chunk math (bft.chunked.row_terms_and_grad, everything
                    but the GEMMs) under torch.compile; compile time is in the untimed warm-up           [floor]
  reference         bft.bft_loss(backend="reference") (full [N, V] logits; OOM is recorded as such)      [floor]
  compiled-ref      torch.compile of the reference                                                       [floor]
  floor             the 5 GEMMs any exact implementation must run: 3 logit GEMMs + dH and dW (torch.matmul)
  *-frozen-head     the LoRA case (student head frozen and shared): no dW            [floor-frozen-head: 4 GEMMs]
  liger-jsd         Liger's Triton LigerFusedLinearJSD (student vs aligned only: two models, no top-k)   [floor-liger]
  liger-chunked-jsd Liger's chunked, compiled LigerFusedLinearJSDLoss (liger_kernel.chunked_loss; the kernel
                    of Liger's "distill_jsd_loss" table), beta=0 (forward KL), tau=2, no hard loss       [floor-liger]
  floor-liger       4 GEMMs of a two-model distillation: 2 logit GEMMs + dH and dW
  cce, cce-frozen-head  Apple's cut-cross-entropy linear_cross_entropy of the student alone (one model, a plain
                    cross-entropy: a single-model reference, not the same objective)   [floor-cce / -frozen-head]
  floor-cce         1 logit GEMM + dH and dW (floor-cce-frozen-head: 1 logit GEMM + dH)
Rows whose package is missing are recorded with status "not installed"; CUDA-only rows on --device cpu with
status "skipped" and the reason; a row that raises is recorded with status "error" and the message, and the run
goes on. Targets at N=8192: triton <= 1.15x its floor and below liger-chunked-jsd's ratio to its own floor; peak
extra memory <= 1 GiB with a frozen head.

Writes (atomically, after every row, so a cut run keeps what it measured): the JSON (--out, default
benchmarks/results/loss_gpu.json, with the device name and versions), beside it a CSV in Liger's benchmark schema
(benchmark/data/all_benchmark_data.csv: one speed and one memory line per row and N) and a PNG of time and memory
vs N for every row.

--device cpu --tiny is a dry run of the script's logic (tiny N/H/V and top-k, fp32, 1 repeat and no warm-up,
torch.compile with the "eager" backend and Liger's chunked loss uncompiled, CUDA-only rows skipped): every code path
but the CUDA-only packages runs, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.metadata
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, bft_inputs, device_name, write_json_atomic  # noqa: E402

import bft  # noqa: E402
from bft.atomic import atomic_save_figure, atomic_write_text  # noqa: E402
from bft.reference import bft_loss_reference  # noqa: E402

PAPER_N = [1024, 2048, 4096, 8192, 16384]
TINY = {"N": [8, 24], "H": 16, "V": 128, "top_k": 4}  # the interpreter runs the top-k loop k times per block
TOP_K = [100]  # the paper's k; --top-k / --tiny change it for the run
#: the order rows run in: what matters most first, compiled and slow rows last (a run cut short keeps the first)
ORDER = [
    "floor",
    "triton",
    "triton-given",
    "floor-frozen-head",
    "triton-frozen-head",
    "triton-given-frozen-head",
    "floor-liger",
    "liger-chunked-jsd",
    "liger-jsd",
    "floor-cce",
    "cce",
    "floor-cce-frozen-head",
    "cce-frozen-head",
    "torch",
    "triton-ungrouped",
    "triton-gemm",
    "compiled-torch",
    "reference",
    "compiled-ref",
]
SLOW = ("reference", "compiled-ref", "torch", "compiled-torch")  # run only up to --skip-slow-above
TARGETS = {"N": 8192, "ratio_to_floor_max": 1.15, "peak_extra_bytes_max_frozen_head": 2**30}
CSV_COLUMNS = [
    "kernel_name",
    "kernel_provider",
    "kernel_operation_mode",
    "metric_name",
    "metric_unit",
    "x_name",
    "x_label",
    "x_value",
    "y_value_50",
    "y_value_20",
    "y_value_80",
    "extra_benchmark_config_str",
    "gpu_name",
    "timestamp",
    "liger_version",
]


def _params():
    return {
        "top_k": TOP_K[0],
        "temperature": 2.0,
        "teacher_lambda": 1.2,
        "alpha_base": 1.0,
        "gamma": 1.0,
        "l2_reg": 1e-4,
        "kl": "forward",
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------------------------------
# inputs: made once per N on the device (the weights once per run) and shared by every row


@dataclass
class Inputs:
    tensors: list  # sh, sw, ah, aw, bh, bw (sh and sw require grad)
    harmful: torch.Tensor
    top_k: int
    _given: tuple | None = None

    def given(self):
        """(topk_ids, risk) of the aligned/base rows, computed once (the teacher cache's content), never timed."""
        if self._given is None:
            from bft.chunked import base_favored_rows

            ah, aw, bh, bw = (t.detach() for t in self.tensors[2:])
            with torch.no_grad():
                self._given = base_favored_rows(ah, aw, bh, bw, top_k=self.top_k)
        return self._given

    def clear_grads(self):
        for t in self.tensors[:2]:
            t.grad = None


def make_inputs(N, H, V, dtype, device, weights=None) -> Inputs:
    """Hidden states for N rows; the three heads are reused from ``weights`` (an earlier Inputs) when given."""
    if weights is None:
        tensors, harmful = bft_inputs(N, H, V, dtype=dtype, device=device, generator_device=device)
    else:
        hidden, harmful = bft_inputs(N, H, 1, dtype=dtype, device=device, generator_device=device)
        tensors = [hidden[0], weights.tensors[1], hidden[2], weights.tensors[3], hidden[4], weights.tensors[5]]
    return Inputs(tensors, harmful, _params()["top_k"])


# -------------------------------------------------------------------------------------------------------------
# the rows


@dataclass
class Impl:
    name: str
    run: Callable | None  # run(inputs) -> None (forward + backward)
    floor: str | None = None  # the row whose time this one is divided by
    prepare: Callable | None = None  # prepare(inputs): what the row is given, made before the warm-up, untimed
    status: str = "ok"  # "ok" or why it cannot run here: "not installed" / "skipped"
    reason: str | None = None
    info: dict = field(default_factory=dict)  # what it is (package version, settings), into the JSON


def _frozen_head(run):
    """The LoRA case: the student's head is frozen (shared with the aligned model), so only dH is computed."""

    def wrapped(inp: Inputs):
        inp.tensors[1].requires_grad_(False)
        try:
            run(inp)
        finally:
            inp.tensors[1].requires_grad_(True)

    return wrapped


def _fused(backend, **kw):
    def run(inp: Inputs):
        bft.bft_loss(*inp.tensors, harmful=inp.harmful, backend=backend, **_params(), **kw).loss.backward()

    return run


def _given(backend):
    def run(inp: Inputs):
        ids, risk = inp.given()
        bft.bft_loss(
            *inp.tensors, harmful=inp.harmful, backend=backend, topk_ids=ids, risk=risk, **_params()
        ).loss.backward()

    return run


def _driver_variant(**settings):
    """bft_loss(backend="triton") with module-level budgets of bft.kernels.bft_loss set as given for the call."""

    def run(inp: Inputs):
        import bft.kernels.bft_loss as driver

        saved = {k: getattr(driver, k) for k in settings}
        for k, v in settings.items():
            setattr(driver, k, v)
        try:
            _fused("triton")(inp)
        finally:
            for k, v in saved.items():
                setattr(driver, k, v)

    return run


def _triton_gemm(inp: Inputs):
    import bft.kernels.bft_loss as driver
    from bft.kernels import bft_logits

    original = bft_logits.three_logits

    def forced(*args, **kwargs):
        kwargs["gemm"] = "triton"
        return original(*args, **kwargs)

    driver.three_logits = forced
    try:
        _fused("triton")(inp)
    finally:
        driver.three_logits = original


def _compiled_torch(compile_backend):
    """backend="torch" with bft.chunked.row_terms_and_grad (the per-chunk softmax / KL / top-k / gradient math,
    everything but the GEMMs) replaced by its torch.compile for the call."""
    from bft import chunked

    compiled = torch.compile(chunked.row_terms_and_grad, backend=compile_backend, dynamic=False)

    def run(inp: Inputs):
        original = chunked.row_terms_and_grad
        chunked.row_terms_and_grad = compiled
        try:
            _fused("torch")(inp)
        finally:
            chunked.row_terms_and_grad = original

    return run


def _compiled_reference(compile_backend):
    compiled = torch.compile(bft_loss_reference, backend=compile_backend, dynamic=False)

    def run(inp: Inputs):
        valid = torch.ones_like(inp.harmful)
        loss, _ = compiled(*inp.tensors, harmful=inp.harmful, valid=valid, **_params())
        loss.backward()

    return run


def _reference(inp: Inputs):
    valid = torch.ones_like(inp.harmful)
    loss, _ = bft_loss_reference(*inp.tensors, harmful=inp.harmful, valid=valid, **_params())
    loss.backward()


def _gemm_floor(logit_models: int, dw: bool):
    """torch.matmul of ``logit_models`` [N, V] logit GEMMs, then dH (and dW) from a [N, V] block of the input dtype."""

    def run(inp: Inputs):
        with torch.no_grad():
            sh, sw, ah, aw, bh, bw = (t.detach() for t in inp.tensors)
            g = sh @ sw.T
            for h, w in ((ah, aw), (bh, bw))[: logit_models - 1]:
                h @ w.T
            g @ sw  # dH
            if dw:
                g.T @ sh  # dW

    return run


def make_impls(args, device) -> dict[str, Impl]:
    cuda = device.type == "cuda"
    cb = args.compile_backend
    impls = [
        Impl("triton", _fused("triton"), "floor"),
        Impl(
            "triton-given",
            _given("triton"),
            "floor",
            prepare=Inputs.given,
            info={"given": "topk_ids and risk precomputed, untimed"},
        ),
        Impl("triton-frozen-head", _frozen_head(_fused("triton")), "floor-frozen-head"),
        Impl("triton-given-frozen-head", _frozen_head(_given("triton")), "floor-frozen-head", prepare=Inputs.given),
        Impl("floor-frozen-head", _gemm_floor(3, dw=False)),
        Impl("triton-gemm", _triton_gemm, "floor"),
        # the driver as measured before dW groups: 256 MiB blocks, dH/dW GEMMs after every chunk
        Impl(
            "triton-ungrouped", _driver_variant(DEFAULT_BLOCK_BYTES_WITH_DW=256 * 2**20, DEFAULT_GROUP_BYTES=0), "floor"
        ),
        Impl("torch", _fused("torch"), "floor"),
        Impl("compiled-torch", _compiled_torch(cb), "floor", info={"compile_backend": cb}),
        Impl("reference", _reference, "floor"),
        Impl("compiled-ref", _compiled_reference(cb), "floor", info={"compile_backend": cb}),
        Impl("floor", _gemm_floor(3, dw=True)),
    ]
    impls += _liger_impls(args, cuda) + _cce_impls(cuda)
    impls = {i.name: i for i in impls}
    return {n: impls[n] for n in ORDER}


def _liger_impls(args, cuda) -> list[Impl]:
    names = [("liger-jsd", "floor-liger"), ("liger-chunked-jsd", "floor-liger")]
    floor = Impl("floor-liger", _gemm_floor(2, dw=True))
    version = _version("liger-kernel")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as e:  # ImportError, or a broken install failing at import
        status = "not installed" if isinstance(e, ImportError) else "error"
        reason = f"liger-kernel: {type(e).__name__}: {e}"
        return [Impl(n, None, f, status=status, reason=reason) for n, f in names] + [floor]

    target_cache = {}

    def targets(inp):  # no hard loss is computed (weight 0), but the API takes labels
        n = inp.tensors[0].shape[0]
        if n not in target_cache:
            target_cache.clear()
            target_cache[n] = torch.zeros(n, dtype=torch.long, device=inp.tensors[0].device)
        return target_cache[n]

    tau = _params()["temperature"]
    fused = LigerFusedLinearJSD(jsd_beta=0.0, temperature=tau)  # beta=0: forward KL(teacher || student)

    def liger_jsd(inp: Inputs):
        sh, sw, ah, aw = inp.tensors[:4]
        fused(sh, sw, ah, aw, None).backward()  # no shift_labels: every row counts

    compiled = not args.tiny
    chunked = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=0.0,
        temperature=tau,
        compiled=compiled,
        chunk_size=1024 if not args.tiny else 16,
    )

    def liger_chunked(inp: Inputs):
        sh, sw, ah, aw = inp.tensors[:4]
        chunked(sh, sw, ah, aw, targets(inp)).backward()

    info = {"liger_kernel": version}
    out = [
        Impl("liger-jsd", liger_jsd, "floor-liger", info={**info, "jsd_beta": 0.0, "temperature": tau}),
        Impl(
            "liger-chunked-jsd",
            liger_chunked,
            "floor-liger",
            info={
                **info,
                "beta": 0.0,
                "temperature": tau,
                "weight_hard_loss": 0.0,
                "weight_soft_loss": 1.0,
                "compiled": compiled,
                "chunk_size": chunked.chunk_size,
            },
        ),
        floor,
    ]
    if not cuda:
        out[0].status, out[0].reason = "skipped", "CUDA only (Liger's Triton kernels); on a GPU it runs"
    return out


def _cce_impls(cuda) -> list[Impl]:
    names = [("cce", "floor-cce"), ("cce-frozen-head", "floor-cce-frozen-head")]
    floors = [Impl("floor-cce", _gemm_floor(1, dw=True)), Impl("floor-cce-frozen-head", _gemm_floor(1, dw=False))]
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        status = "not installed" if isinstance(e, ImportError) else "error"
        reason = f"cut-cross-entropy: {type(e).__name__}: {e}"
        return [Impl(n, None, f, status=status, reason=reason) for n, f in names] + floors

    cache = {}

    def run(inp: Inputs):
        sh, sw = inp.tensors[:2]
        n = sh.shape[0]
        if n not in cache:  # fixed random targets per N (made in the warm-up, outside the timed region)
            cache.clear()
            g = torch.Generator(device="cpu").manual_seed(0)
            cache[n] = torch.randint(0, sw.shape[0], (n,), generator=g).to(sh.device)
        linear_cross_entropy(sh, sw, cache[n]).backward()

    info = {
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "impl": "cce",
        "filter_eps": "high (default)",
        "objective": "cross-entropy of the student alone",
    }
    out = [
        Impl("cce", run, "floor-cce", info=info),
        Impl("cce-frozen-head", _frozen_head(run), "floor-cce-frozen-head", info=info),
    ]
    if not cuda:
        for i in out:
            i.status, i.reason = "skipped", "CUDA only (CCE's Triton kernels fail under the interpreter)"
    return out + floors


# -------------------------------------------------------------------------------------------------------------
# measuring


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quantiles(times):
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return statistics.median(times), q[1], q[7]


def measure(impl: Impl, inp: Inputs, device, repeats, warmup=1) -> dict:
    """Median time of ``repeats`` forward+backward runs after ``warmup`` more (compilation, autotuning), and on CUDA
    the peak memory allocated beyond the inputs, what the row was given (ids) and the gradients themselves."""
    cuda = device.type == "cuda"
    try:
        if impl.prepare:
            impl.prepare(inp)  # the given ids (the teacher cache's content): outside the timing and the baseline
        for _ in range(warmup):
            impl.run(inp)  # compile, autotune
        inp.clear_grads()
        _sync(device)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            inp.clear_grads()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                impl.run(inp)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                impl.run(inp)
                times.append(time.perf_counter() - t0)
        p50, p20, p80 = _quantiles(times)
        out = {
            "status": "ok",
            "seconds": p50,
            "seconds_p20": p20,
            "seconds_p80": p80,
            "repeats": repeats,
            "warmup": warmup,
        }
        if cuda:
            grads = sum(t.grad.numel() * t.grad.element_size() for t in inp.tensors[:2] if t.grad is not None)
            peak = torch.cuda.max_memory_allocated()
            out["peak_extra_bytes"] = int(peak - base - grads)
            out["peak_total_bytes"] = int(peak)  # Liger's own memory metric counts everything allocated
        else:
            out["peak_extra_bytes"] = None
        return out
    except torch.OutOfMemoryError:
        return {"status": "OOM", "seconds": None, "peak_extra_bytes": None, "reason": "torch.OutOfMemoryError"}
    except Exception as e:  # a row that fails is recorded; the others still run
        return {
            "status": "error",
            "seconds": None,
            "peak_extra_bytes": None,
            "reason": f"{type(e).__name__}: {str(e)[:500]}",
        }
    finally:
        inp.clear_grads()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def ratios(row: dict, impls: dict[str, Impl]) -> dict:
    out = {}
    for name, impl in impls.items():
        r, f = row.get(name, {}), row.get(impl.floor or "", {})
        if impl.floor and r.get("seconds") and f.get("seconds"):
            out[name] = r["seconds"] / f["seconds"]
    return out


def target_check(payload: dict) -> dict | None:
    """The issue's targets at N = 8192, where that row was measured (None for a quantity that was not)."""
    row = next((r for r in payload["rows"] if r["N"] == TARGETS["N"]), None)
    if row is None:
        return None
    r = row["ratio_to_floor"]
    frozen = (row.get("triton-frozen-head") or {}).get("peak_extra_bytes")
    return {
        "triton_ratio_to_floor": r.get("triton"),
        "triton_within_ratio_max": None if "triton" not in r else r["triton"] <= TARGETS["ratio_to_floor_max"],
        "liger_chunked_ratio_to_its_floor": r.get("liger-chunked-jsd"),
        "triton_ratio_below_liger_chunked": (
            None if "triton" not in r or "liger-chunked-jsd" not in r else r["triton"] < r["liger-chunked-jsd"]
        ),
        "frozen_head_peak_extra_bytes": frozen,
        "frozen_head_within_memory_max": (
            None if frozen is None else frozen <= TARGETS["peak_extra_bytes_max_frozen_head"]
        ),
    }


# -------------------------------------------------------------------------------------------------------------
# outputs


def liger_csv(payload: dict) -> str:
    """One speed (ms) and one memory (MB, peak extra) line per measured row and N, in Liger's benchmark schema."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    shape = payload["shape"]
    for row in payload["rows"]:
        for name, m in row.items():
            if not isinstance(m, dict) or m.get("status") != "ok":
                continue
            impl = payload["implementations"][name]
            config = {
                "H": shape["H"],
                "V": shape["V"],
                "dtype": shape["dtype"],
                "top_k": shape["top_k"],
                "floor": impl["floor"],
                "frozen_head": "frozen-head" in name,
                "device": payload["device_type"],
                "memory": "peak allocated beyond inputs and gradients",
            }
            common = {
                "kernel_name": "bft_distill_loss",
                "kernel_provider": name,
                "kernel_operation_mode": "full",
                "x_name": "BT",
                "x_label": "B x T",
                "x_value": row["N"],
                "extra_benchmark_config_str": json.dumps(config),
                "gpu_name": payload["device"],
                "timestamp": payload["date_utc"].replace("T", " ").rstrip("Z"),
                "liger_version": payload["versions"].get("liger-kernel") or "",
            }
            ms = [m["seconds"] * 1e3, m["seconds_p20"] * 1e3, m["seconds_p80"] * 1e3]
            w.writerow(
                {
                    **common,
                    "metric_name": "speed",
                    "metric_unit": "ms",
                    "y_value_50": ms[0],
                    "y_value_20": ms[1],
                    "y_value_80": ms[2],
                }
            )
            if m.get("peak_extra_bytes") is not None:
                mb = m["peak_extra_bytes"] / 2**20
                w.writerow(
                    {
                        **common,
                        "metric_name": "memory",
                        "metric_unit": "MB",
                        "y_value_50": mb,
                        "y_value_20": mb,
                        "y_value_80": mb,
                    }
                )
    return buf.getvalue()


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.5))
    for impl in payload["implementations"]:
        pts = [(r["N"], r[impl]) for r in payload["rows"] if (r.get(impl) or {}).get("seconds")]
        if not pts:
            continue
        style = "--" if impl.startswith("floor") else "-"
        ax_t.plot([n for n, _ in pts], [m["seconds"] * 1e3 for _, m in pts], style, marker="o", label=impl)
        mem = [(n, m["peak_extra_bytes"]) for n, m in pts if m.get("peak_extra_bytes")]
        if mem:
            ax_m.plot([n for n, _ in mem], [b / 2**30 for _, b in mem], style, marker="o", label=impl)
    for ax, label in ((ax_t, "forward+backward (ms)"), (ax_m, "peak extra memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N = B x T (token positions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = ax_t.get_legend_handles_labels()
    ax_m.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # one legend, outside
    if not ax_m.lines:
        ax_m.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax_m.transAxes)
    s = payload["shape"]
    fig.suptitle(f"BFT loss, H={s['H']}, V={s['V']}, {s['dtype']} — {payload['device']}")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def write_outputs(payload: dict, out: Path, *, figure: bool = True) -> list[Path]:
    payload["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(out, payload)
    atomic_write_text(out.with_suffix(".csv"), liger_csv(payload))
    if figure:
        plot(payload, out.with_suffix(".png"))
    return [out, out.with_suffix(".csv"), out.with_suffix(".png")]


# -------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="dry run: tiny N/H/V/top-k, fp32 (use with --device cpu)")
    p.add_argument("--N", type=int, nargs="*", help=f"token positions (default {PAPER_N}; --tiny {TINY['N']})")
    p.add_argument("--H", type=int, help="hidden size (default 4096; --tiny 32)")
    p.add_argument("--V", type=int, help="vocabulary (default 128256; --tiny 384)")
    p.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 5; --tiny 1)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 1; --tiny 0)")
    p.add_argument("--top-k", type=int, help=f"k of the base-favored set (default 100; --tiny {TINY['top_k']})")
    p.add_argument("--only", nargs="*", help="rows to run (default: all); the others are recorded as not selected")
    p.add_argument(
        "--skip-slow-above",
        type=int,
        default=4096,
        help=f"run {', '.join(SLOW)} only up to this N (they are slow or OOM)",
    )
    p.add_argument(
        "--compile-backend", help="torch.compile backend of the compiled rows (default inductor; --tiny eager)"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "loss_gpu.json")
    a = p.parse_args(argv)
    a.N = a.N or (TINY["N"] if a.tiny else PAPER_N)
    a.H = a.H or (TINY["H"] if a.tiny else 4096)
    a.V = a.V or (TINY["V"] if a.tiny else 128256)
    a.repeats = a.repeats or (1 if a.tiny else 5)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.tiny else 1)
    a.top_k = a.top_k or (TINY["top_k"] if a.tiny else 100)
    a.compile_backend = a.compile_backend or ("eager" if a.tiny else "inductor")
    return a


def main(argv=None):
    a = parse_args(argv)
    TOP_K[0] = a.top_k
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "loss_gpu.py --device cuda needs a CUDA GPU; for a dry run: TRITON_INTERPRET=1 python "
            "benchmarks/loss_gpu.py --device cpu --tiny"
        )
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("note: TRITON_INTERPRET=1 is not set; the triton rows will fail on CPU tensors", file=sys.stderr)
    dtype = torch.bfloat16 if device.type == "cuda" and not a.tiny else torch.float32
    impls = make_impls(a, device)
    selected = set(impls) if not a.only else set(a.only)
    unknown = selected - set(impls)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; known: {list(impls)}")
    payload = {
        "benchmark": "bft_loss forward+backward",
        "device": device_name(device),
        "device_type": device.type,
        "dry_run": a.tiny,
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "bft": bft.__version__,
            "liger-kernel": _version("liger-kernel"),
            "cut-cross-entropy": _version("cut-cross-entropy"),
        },
        "shape": {"H": a.H, "V": a.V, "dtype": str(dtype).removeprefix("torch."), "top_k": _params()["top_k"]},
        "params": _params(),
        "repeats": a.repeats,
        "warmup": a.warmup,
        "implementations": {
            n: {"floor": i.floor, "status": i.status, "reason": i.reason, **i.info} for n, i in impls.items()
        },
        "targets": TARGETS,
        "rows": [],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    weights = None
    for N in a.N:
        row = {"N": N, "ratio_to_floor": {}}
        payload["rows"].append(row)
        inp = make_inputs(N, a.H, a.V, dtype, device, weights)
        weights = weights or inp
        for name, impl in impls.items():
            if name not in selected:
                row[name] = {"status": "skipped", "reason": "not selected (--only)"}
            elif impl.status != "ok":
                row[name] = {"status": impl.status, "reason": impl.reason}
            elif name in SLOW and N > a.skip_slow_above:
                row[name] = {"status": "skipped", "reason": f"N > --skip-slow-above {a.skip_slow_above}"}
            else:
                row[name] = measure(impl, inp, device, a.repeats, a.warmup)
            m = row[name]
            shown = f"{m['seconds'] * 1e3:9.2f} ms" if m.get("seconds") else f"{m['status']}: {m.get('reason')}"
            print(f"N={N:6d} {name:26s} {shown}", flush=True)
            row["ratio_to_floor"] = ratios(row, impls)
            write_outputs(payload, a.out, figure=False)  # after every row: a run cut short keeps what it measured
        del inp
        payload["target_check"] = target_check(payload)
        files = write_outputs(payload, a.out)
    for row in payload["rows"]:
        ratio = ", ".join(f"{k} {v:.2f}" for k, v in row["ratio_to_floor"].items())
        print(f"N={row['N']}: ratio to own floor: {ratio}")
    print("wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
