"""Memory and speed of the BFT trainer: peak memory, largest batch, tokens/s, and BFT step time vs a plain SFT step.

    python benchmarks/trainer_bench.py --device cuda            # Llama-3.1-8B-shaped trio, seq 2048, three modes
    python benchmarks/trainer_bench.py --device cuda --quick    # batch search up to 8, no bisection, 2 repeats
    python benchmarks/trainer_bench.py --device cpu             # small Llama on CPU (float32), fixed batch sizes
    python benchmarks/trainer_bench.py --device cpu --quick     # tiny Llama, one batch size (seconds)

What runs is what the trainer runs (``trainer/train.py``): the trio comes from randomly initialised Llama models
(``LlamaConfig`` + ``from_config``, no checkpoint needed; 8-bit frozen weights are the same ``bitsandbytes``
``Linear8bitLt`` modules ``from_pretrained(load_in_8bit=True)`` makes), the student is wrapped by
:func:`bft.trainer.modeling.add_lora` / :class:`~bft.trainer.modeling.BFTStudent`, one micro-batch is
:func:`bft.trainer.train.micro_batch_loss` (frozen teacher forwards + student forward with the fused
:func:`bft.bft_loss`), then backward, gradient clipping and the optimizer step of
:func:`bft.trainer.train.make_optimizer`. One "step" below = one micro-batch with ``grad_accum = 1``.

Modes (``--modes``), each with the trainer's default LoRA / loss settings and gradient checkpointing:
  lora            LoRA (r=16, all-linear) on a 16-bit aligned model that doubles as the teacher; 16-bit base
  lora-8bit       the same with 8-bit frozen weights (student body and base; bitsandbytes, lm_heads stay 16-bit)
  full-adam8bit   full fine-tuning, 16-bit student + 8-bit AdamW, 8-bit frozen aligned and base models
                  (= trainer/configs/llama-3.1-8b-full.yaml)

Per mode:
  * batch search (CUDA): batch 1, 2, 4, ... until OOM (caught), then bisection -> the largest batch that fits,
    its peak memory (``torch.cuda.max_memory_allocated``; weights + optimizer states + activations) and tokens/s;
    ``--batch-sizes`` gives a fixed list instead (always so on CPU, where there is no OOM to catch);
  * BFT / SFT ratio: at the largest batch where both fit, BFT steps and plain SFT steps (cross-entropy of the
    same student on the same batch's response tokens, same optimizer) interleaved after a warm-up of each, median
    step times and their ratio. Goal <= 1.8 (the limit is ~5/3: BFT adds two frozen forwards to the student's
    forward + backward). The ratio of record is wall time on CUDA and process CPU time on CPU (immune to other
    processes taking the cores of a shared machine; wall-time ratios are stored too).
  * teacher cache (``--no-cached`` skips it): at that batch, the one-time build of the exact frozen-teacher
    cache for the batch's rows (``bft.trainer.cache.write_cache``: frozen forwards, top-k and risk, atomic shard
    writes), then cached BFT steps (rows read back through ``TeacherCache``, no frozen forward), live BFT steps and
    SFT steps interleaved: cached / SFT (goal <= 1.1), the build time, disk bytes per token and the break-even
    epoch count build / (live step - cached step).
On CPU the memory is the peak resident set size (VmHWM, reset before each measurement), the 8-bit modes need CUDA:
lora-8bit is skipped and full-adam8bit runs as full fine-tuning with fp32 frozen models and torch AdamW.

Writes ``benchmarks/results/trainer_gpu.json`` / ``trainer_cpu.json`` (``--quick``: ``trainer_<dev>_quick.json``)
with the device name, versions, the model config, every trial and the ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import logging
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import RESULTS, device_name, write_json_atomic  # noqa: E402
from bft.trainer.config import Config, FinetuneConfig, ModelConfig, OptimConfig, validate  # noqa: E402
from bft.trainer.modeling import (  # noqa: E402
    BFTStudent,
    Trio,
    add_lora,
    enable_activation_checkpointing,
    freeze,
    lm_head_weight,
    resolve_attn_implementation,
    torch_dtype,
)
from bft.trainer.train import cache_teacher_inputs, loss_module, make_optimizer, micro_batch_loss  # noqa: E402
from torch import nn  # noqa: E402

from bft.hf.models import final_hidden_states  # noqa: E402

#: Llama shapes. "llama-3.1-8b" is Meta-Llama-3.1-8B; "small" keeps its proportions (GQA 4:1, MLP 3.5x, lm_head
#: ~7% of the weights) at 31M parameters so a CPU step takes about a second; "tiny" is for --quick and tests.
PRESETS = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1792,
        vocab_size=4096,
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=448,
        vocab_size=1024,
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
}
_COMMON_LLAMA = dict(
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


@dataclass(frozen=True)
class Mode:
    finetune: str  # "lora" | "full"
    frozen_quantization: str | None
    optimizer: str


MODES = {
    "lora": Mode("lora", None, "adamw"),
    "lora-8bit": Mode("lora", "8bit", "adamw"),
    "full-adam8bit": Mode("full", "8bit", "adamw_8bit"),
}
HARMFUL_RATIO = 0.4  # the trainer's (and the paper's) default
RATIO_GOAL = 1.8
CACHED_RATIO_GOAL = 1.1  # a BFT step from the teacher cache vs a plain SFT step of the same student


# -------------------------------------------------------------------------------------------------------------
# the random-init trio


def require_bitsandbytes(what: str):
    """Import bitsandbytes or raise a RuntimeError that says what needs it and how to get it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"{what} needs bitsandbytes (CUDA): pip install bitsandbytes (or pip install 'bft[quant]')")
    try:
        import bitsandbytes
    except Exception as e:  # a broken CUDA setup shows up here, not at find_spec
        raise RuntimeError(f"{what} needs bitsandbytes, which failed to import: {e}") from e
    return bitsandbytes


def random_causal_lm(llama: dict, *, dtype: torch.dtype, device: torch.device, attn: str, seed: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` built directly on ``device`` in ``dtype`` (no checkpoint)."""
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**llama), attn_implementation=attn, **{dtype_kwarg: dtype})
    model.config.use_cache = False
    return model


def quantize_8bit_(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``nn.Linear`` but the lm_head by a frozen bitsandbytes ``Linear8bitLt`` (threshold 6.0, int8
    weights), in place — what ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True,
    llm_int8_skip_modules=["lm_head"]))`` builds (``bft.hf.models.load_model(quantization="8bit")``). Weights pass
    through the CPU once: bitsandbytes quantizes an ``Int8Params`` when it moves from CPU to the GPU."""
    bnb = require_bitsandbytes("8-bit frozen weights")
    head = model.get_output_embeddings()
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child is not head
    ]
    for parent, name, child in targets:
        q = bnb.nn.Linear8bitLt(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        weight = child.weight.data.to("cpu")
        child.weight = None  # free the 16-bit copy on the device before the int8 one lands
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(parent, name, q)
        del weight
    model.is_loaded_in_8bit = True  # what transformers sets; peft picks its bitsandbytes LoRA layers from it
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def build_random_trio(config: Config, llama: dict, device: torch.device) -> Trio:
    """:func:`bft.trainer.modeling.build_trio` for random-init models: same freezing, quantization layout,
    activation checkpointing and LoRA wrapping, in the same order."""
    m = config.model
    dtype = torch_dtype(m.dtype)
    attn = resolve_attn_implementation(m.attn_implementation, dtype, device)
    lora = config.finetune.mode == "lora"
    quant = m.frozen_quantization

    def frozen(seed):
        model = freeze(random_causal_lm(llama, dtype=dtype, device=device, attn=attn, seed=seed))
        return quantize_8bit_(model, device) if quant else model

    base = frozen(seed=1)
    if lora:  # the student's own weights are frozen (only adapters train): quantizable, and they are the teacher
        student = random_causal_lm(llama, dtype=dtype, device=device, attn=attn, seed=0)
        if quant:
            quantize_8bit_(freeze(student), device)
        aligned = None
    else:  # a trainable 16-bit student plus a separate frozen (quantizable) aligned copy
        student = random_causal_lm(llama, dtype=dtype, device=device, attn=attn, seed=0)
        aligned = frozen(seed=0)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(student)
    if lora:
        student = add_lora(student, config)
    student.train()
    V = llama["vocab_size"]
    return Trio(student=student, base=base, aligned=aligned, tokenizer=None, base_tokenizer=None, vocab_size=V)


def make_config(mode: Mode, args) -> Config:
    """The trainer's Config for a mode (its defaults for LoRA and the loss; the benchmark's dtype/attention)."""
    config = Config(
        model=ModelConfig(
            base="random-llama",
            aligned="random-llama",
            dtype=args.dtype,
            frozen_quantization=mode.frozen_quantization,
            attn_implementation=args.attn,
            gradient_checkpointing=not args.no_gradient_checkpointing,
        ),
        finetune=FinetuneConfig(mode=mode.finetune),
        optim=OptimConfig(name=mode.optimizer),
    )
    return validate(config)


# -------------------------------------------------------------------------------------------------------------
# batches, steps, memory


def synthetic_batch(B: int, L: int, prompt_len: int, V: int, device: torch.device, seed: int = 0) -> dict:
    """A :class:`bft.trainer.data.MixedBatches`-shaped batch: B full rows of L random tokens, the first
    ``prompt_len`` the prompt (hidden state t predicts token t + 1, so rows ``prompt_len-1 .. L-2`` are valid),
    the first ``round(0.4·B)`` rows (at least one) harmful."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    valid = torch.zeros(B, L, dtype=torch.bool)
    valid[:, prompt_len - 1 : L - 1] = True
    harmful = torch.zeros(B, L, dtype=torch.bool)
    harmful[: max(1, round(HARMFUL_RATIO * B))] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long), "valid": valid, "harmful": harmful}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["n_tokens"] = B * L
    return batch


def sft_loss(student_model: nn.Module, batch: dict, vocab_size: int) -> torch.Tensor:
    """Plain SFT: cross-entropy of the student's next-token logits on the same valid (response) rows the BFT loss
    uses — the same decoder forward, then ``hidden @ lm_head.T`` in the model dtype, upcast to fp32 for the loss
    (what ``LlamaForCausalLM(labels=...)`` does, restricted to the rows that carry a label)."""
    hidden = final_hidden_states(student_model, batch["input_ids"], batch["attention_mask"])
    weight = lm_head_weight(student_model, vocab_size)
    valid = batch["valid"]
    labels = torch.roll(batch["input_ids"], -1, dims=1)[valid]  # valid never marks a row's last position
    logits = hidden[valid] @ weight.T
    return F.cross_entropy(logits.float(), labels)


class Steps:
    """One optimizer step (grad_accum = 1) of BFT or SFT, as trainer/train.py runs it on one process."""

    def __init__(self, trio: Trio, config: Config):
        self.trio = trio
        self.student = BFTStudent(trio.student, loss_module(config), trio.vocab_size)
        self.student_model = self.student.model
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config.optim, self.params)
        self.max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm is not None else float("inf")

    def _finish(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def bft(self, batch: dict) -> None:
        result = micro_batch_loss(self.trio, self.student, batch)
        result["loss"].backward()
        self._finish()

    def cached(self, batch: dict) -> None:
        """A BFT step from the teacher cache (``self.teacher_cache = (cache, heads, examples)``): the frozen
        models' rows are read from the memory-mapped shards, no frozen forward runs."""
        cache, heads, examples = self.teacher_cache
        teacher = cache_teacher_inputs(cache, heads, examples, batch, batch["input_ids"].device)
        micro_batch_loss(self.trio, self.student, batch, teacher)["loss"].backward()
        self._finish()

    def sft(self, batch: dict) -> None:
        sft_loss(self.student_model, batch, self.trio.vocab_size).backward()
        self._finish()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    """Peak memory: the CUDA allocator's peak on GPU; on CPU the peak resident set size (VmHWM, reset through
    /proc/self/clear_refs where Linux allows it, else the process's lifetime peak ``ru_maxrss``)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.resettable = True
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.resettable = False

    @property
    def metric(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated (weights + optimizer states + activations)"
        if self.resettable:
            return "peak resident set size of the process (VmHWM, reset before each measurement)"
        return "peak resident set size of the process over its lifetime (ru_maxrss; VmHWM could not be reset)"

    def collect(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        else:
            try:  # hand freed heap back to the OS so the next RSS peak starts from what is really in use
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass

    def reset_peak(self) -> None:
        self.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated())
        return (_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        if self.resettable and (hwm := _status_kib("VmHWM")) is not None:
            return hwm * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def peak_reserved(self) -> int | None:
        return int(torch.cuda.max_memory_reserved()) if self.cuda else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, batch, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn(batch)``. The CPU time is what a CPU run reports as
    its ratio of record: unlike wall time it does not grow while other processes hold the cores."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn(batch)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def is_oom(error: BaseException) -> bool:
    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _median(xs):
    return statistics.median(xs) if xs else None


# -------------------------------------------------------------------------------------------------------------
# measurements


class Bench:
    def __init__(self, steps: Steps, mem: Memory, device: torch.device, args, V: int):
        self.steps, self.mem, self.device, self.args, self.V = steps, mem, device, args, V

    def batch(self, B: int) -> dict:
        return synthetic_batch(B, self.args.seq_len, self.args.prompt_len, self.V, self.device, seed=B)

    def _recover(self) -> None:
        self.steps.optimizer.zero_grad(set_to_none=True)
        self.mem.collect()

    def trial(self, B: int) -> dict:
        """BFT steps at batch B: one warm-up (kernel compilation, optimizer states), ``repeats`` timed; OOM caught."""
        batch = self.batch(B)
        self.mem.reset_peak()
        pairs, error = [], None
        try:
            self.steps.bft(batch)
            pairs = [timed(self.steps.bft, batch, self.device) for _ in range(self.args.repeats)]
        except Exception as e:  # only OOM is expected; anything else is re-raised below
            if not is_oom(e):
                raise
            error = type(e).__name__
        row = {
            "batch_size": B,
            "status": "oom" if error else "ok",
            "peak_memory_bytes": self.mem.peak(),
            "peak_reserved_bytes": self.mem.peak_reserved(),
        }
        del batch
        if error:
            self._recover()
            return row
        times = [w for w, _ in pairs]
        step = _median(times)
        row.update(
            bft_step_s=step,
            bft_step_s_all=times,
            tokens_per_s=B * self.args.seq_len / step,
            tokens_per_s_best=B * self.args.seq_len / min(times),
        )  # best-of: for noisy shared CPUs
        if self.device.type == "cpu":
            cpu = [c for _, c in pairs]
            row.update(
                bft_step_cpu_s=_median(cpu),
                bft_step_cpu_s_all=cpu,
                tokens_per_cpu_s=B * self.args.seq_len / _median(cpu),
            )
        return row

    def search(self, sizes: list[int] | None, max_batch: int, bisect: bool, progress) -> list[dict]:
        """Fixed ``sizes`` (stop at the first OOM), or doubling from 1 until OOM / ``max_batch`` then bisection."""
        trials = []

        def run(B):
            row = self.trial(B)
            trials.append(row)
            progress.set_postfix(batch=B, status=row["status"], mem_gib=f"{row['peak_memory_bytes'] / 2**30:.1f}")
            progress.update(1)
            return row["status"] == "ok"

        if sizes:
            for B in sizes:
                if not run(B):
                    break
            return trials
        ok, bad, B = 0, None, 1
        while B <= max_batch:
            if run(B):
                ok, B = B, B * 2
            else:
                bad = B
                break
        hi = bad if bad is not None else max_batch + 1
        while bisect and ok and hi - ok > 1:
            mid = (ok + hi) // 2
            if run(mid):
                ok = mid
            else:
                hi = mid
        return trials

    def ratio(self, B: int) -> dict | None:
        """BFT vs SFT step time at batch B, interleaved; halves B while SFT (or BFT) runs out of memory."""
        while B >= 1:
            batch = self.batch(B)
            bft_times, sft_times, error = [], [], None
            peaks = {}
            try:
                for name, fn in (("bft", self.steps.bft), ("sft", self.steps.sft)):  # warm-ups, peak of each
                    self.mem.reset_peak()
                    fn(batch)
                    peaks[name] = self.mem.peak()
                for _ in range(self.args.repeats):
                    bft_times.append(timed(self.steps.bft, batch, self.device))
                    sft_times.append(timed(self.steps.sft, batch, self.device))
            except Exception as e:
                if not is_oom(e):
                    raise
                error = type(e).__name__
            del batch
            if error:
                self._recover()
                B //= 2
                continue
            bft_wall, sft_wall = [w for w, _ in bft_times], [w for w, _ in sft_times]
            bft, sft = _median(bft_wall), _median(sft_wall)
            out = {
                "batch_size": B,
                "bft_step_s": bft,
                "sft_step_s": sft,
                "bft_over_sft_wall": bft / sft,
                "bft_over_sft_wall_best": min(bft_wall) / min(sft_wall),
                "bft_step_s_all": bft_wall,
                "sft_step_s_all": sft_wall,
                "bft_tokens_per_s": B * self.args.seq_len / bft,
                "sft_tokens_per_s": B * self.args.seq_len / sft,
                "bft_peak_memory_bytes": peaks["bft"],
                "sft_peak_memory_bytes": peaks["sft"],
            }
            ratio = out["bft_over_sft_wall"]
            if self.device.type == "cpu":
                bft_cpu, sft_cpu = [c for _, c in bft_times], [c for _, c in sft_times]
                ratio = _median(bft_cpu) / _median(sft_cpu)
                out.update(
                    bft_step_cpu_s=_median(bft_cpu),
                    sft_step_cpu_s=_median(sft_cpu),
                    bft_over_sft_cpu_time=ratio,
                    bft_step_cpu_s_all=bft_cpu,
                    sft_step_cpu_s_all=sft_cpu,
                )
            out.update(
                bft_over_sft=ratio,
                ratio_basis="CPU time" if self.device.type == "cpu" else "wall time",
                goal_max=RATIO_GOAL,
                meets_goal=ratio <= RATIO_GOAL,
            )
            return out
        return None

    def cached(self, B: int, top_k: int, dtype: torch.dtype) -> dict:
        """The teacher cache at batch B: its one-time build (frozen forwards, top-k and risk, atomic shard writes)
        for this batch's rows, then cached BFT steps, live BFT steps and plain SFT steps interleaved. The
        break-even epoch count is build / (live step − cached step): building the cache for the whole data set
        costs one frozen pass per batch of the epoch, and every epoch from the cache saves the difference."""
        import tempfile

        from bft.trainer import cache as tc
        from bft.trainer.data import Example

        batch = self.batch(B)
        ids, valid, harmful = (batch[k].cpu() for k in ("input_ids", "valid", "harmful"))
        start = int(valid[0].nonzero()[0]) + 1  # response_start: the first valid row predicts it
        examples = [Example(tuple(ids[r].tolist()), start, bool(harmful[r, 0])) for r in range(B)]
        rows = int(valid.sum())
        fp = {"benchmark": "synthetic batch", "batch_size": B, "seq_len": self.args.seq_len}
        with tempfile.TemporaryDirectory(prefix="bft-cache-bench-") as root:
            root = Path(root)
            sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            manifest = tc.write_cache(
                root,
                self.steps.trio,
                examples,
                fp,
                dtype=dtype,
                top_k=top_k,
                shard_bytes=256 * 2**20,
                batch_size=B,
                pad_id=0,
                progress=False,
                log=lambda *_: None,
            )
            sync(self.device)
            build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            head_bytes = sum(r["bytes"] for r in manifest["heads"].values())
            shard_bytes = tc.cache_bytes(root, manifest) - head_bytes
            cache = tc.TeacherCache(root, fp)
            heads = cache.heads(self.device, dtype, aligned=not self.steps.trio.lora)
            self.steps.teacher_cache = (cache, heads, examples)
            peaks, times = {}, {"cached": [], "bft": [], "sft": []}
            fns = {"cached": self.steps.cached, "bft": self.steps.bft, "sft": self.steps.sft}
            for name, fn in fns.items():  # warm-ups, and the peak of each
                self.mem.reset_peak()
                fn(batch)
                peaks[name] = self.mem.peak()
            for _ in range(self.args.repeats):
                for name, fn in fns.items():
                    times[name].append(timed(fn, batch, self.device))
            del self.steps.teacher_cache, cache, heads
        basis = 1 if self.device.type == "cpu" else 0  # CPU time on CPU (shared cores), wall time on CUDA
        step = {name: _median([t[basis] for t in ts]) for name, ts in times.items()}
        wall = {name: _median([t[0] for t in ts]) for name, ts in times.items()}
        build = build_cpu_s if basis else build_s
        saved = step["bft"] - step["cached"]
        return {
            "batch_size": B,
            "response_tokens": rows,
            "ratio_basis": "CPU time" if basis else "wall time",
            "cached_step_s": step["cached"],
            "live_bft_step_s": step["bft"],
            "sft_step_s": step["sft"],
            "cached_over_sft": step["cached"] / step["sft"],
            "live_bft_over_sft": step["bft"] / step["sft"],
            "cached_over_sft_wall": wall["cached"] / wall["sft"],
            "live_over_sft_wall": wall["bft"] / wall["sft"],
            "cached_goal_max": CACHED_RATIO_GOAL,
            "meets_cached_goal": step["cached"] / step["sft"] <= CACHED_RATIO_GOAL,
            "build_s": build,
            "build_wall_s": build_s,
            "build_s_per_token": build / rows,
            "break_even_epochs": build / saved if saved > 0 else None,
            "disk_bytes_per_token": shard_bytes / rows,
            "disk_bytes_heads": head_bytes,
            "disk_bytes_per_token_formula": "(H_a + H_b) * dtype bytes + 4 * top_k + 4",
            "peak_memory_bytes": peaks,
            "steps_all": {name: [list(t) for t in ts] for name, ts in times.items()},
        }


def run_mode(name: str, args, device: torch.device, llama: dict, mem: Memory, progress) -> dict:
    mode = MODES[name]
    note = None
    if device.type == "cpu" and (mode.frozen_quantization or mode.optimizer != "adamw") and not args.cpu_8bit:
        if mode.finetune == "lora":
            return {
                "status": "skipped",
                "reason": "LoRA on 8-bit frozen weights needs bitsandbytes and a CUDA GPU "
                "(or --cpu-8bit with a bitsandbytes that has a CPU backend)",
            }
        note = (
            "CPU stand-in: bitsandbytes 8-bit weights and 8-bit AdamW need CUDA, so unquantized frozen models "
            "and torch AdamW"
        )
        mode = Mode(mode.finetune, None, "adamw")
    if mode.frozen_quantization or mode.optimizer != "adamw":
        try:
            require_bitsandbytes(f"mode {name!r}")
        except RuntimeError as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            return {"status": "skipped", "reason": str(e)}
    config = make_config(mode, args)
    mem.reset_peak()
    before = mem.current()
    t0 = time.perf_counter()
    oom = None
    try:
        trio = build_random_trio(config, llama, device)
        steps = Steps(trio, config)
    except Exception as e:  # only OOM is expected; anything else is re-raised
        if not is_oom(e):
            raise
        oom = f"{type(e).__name__} while building the models: {str(e).splitlines()[0] if str(e) else ''}"
    if oom:
        mem.collect()
        return {
            "status": "does_not_fit",
            "reason": oom,
            "finetune": mode.finetune,
            "frozen_quantization": mode.frozen_quantization,
            "optimizer": mode.optimizer,
        }
    build_s = time.perf_counter() - t0
    weights = mem.current()
    bench = Bench(steps, mem, device, args, llama["vocab_size"])
    trials = bench.search(args.batch_sizes, args.max_batch, not args.no_bisect, progress)
    fitting = [t for t in trials if t["status"] == "ok"]
    best = max(fitting, key=lambda t: t["batch_size"]) if fitting else None
    ratio = bench.ratio(best["batch_size"]) if best else None
    cached = None
    if best and not args.no_cached:
        cached = bench.cached(
            ratio["batch_size"] if ratio else best["batch_size"], config.loss.top_k, torch_dtype(config.model.dtype)
        )
    n_trainable = sum(p.numel() for p in steps.params)
    n_student = sum(p.numel() for p in trio.student.parameters())
    result = {
        "status": "ok" if best else "does_not_fit",
        "finetune": mode.finetune,
        "frozen_quantization": mode.frozen_quantization,
        "optimizer": mode.optimizer,
        "note": note,
        "config": {k: v for k, v in config.to_dict().items() if k in ("model", "finetune", "loss", "optim")},
        "trainable_params": n_trainable,
        "student_params": n_student,
        "build_s": build_s,
        "memory_before_build_bytes": before,
        "memory_after_build_bytes": weights,  # weights (+ LoRA); optimizer states appear at the first step
        "trials": trials,
        "max_batch_size": best["batch_size"] if best else None,
        "max_batch_limited_by": (
            "fixed batch list"
            if args.batch_sizes
            else "OOM"
            if len(fitting) < len(trials)
            else f"--max-batch {args.max_batch}"
        ),
        "peak_memory_bytes": best["peak_memory_bytes"] if best else None,
        "peak_reserved_bytes": best["peak_reserved_bytes"] if best else None,
        "peak_memory_above_start_bytes": best["peak_memory_bytes"] - before if best else None,
        "tokens_per_s": best["tokens_per_s"] if best else None,
        "tokens_per_s_best": best["tokens_per_s_best"] if best else None,
        "tokens_per_cpu_s": best.get("tokens_per_cpu_s") if best else None,
        "bft_vs_sft": ratio,
        "teacher_cache": cached,
    }
    del bench, steps, trio
    mem.collect()
    return result


# -------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes (CPU: the tiny model)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: cuda llama-3.1-8b, cpu small)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (e.g. a fast smoke run of the GPU path)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--seq-len", type=int, help="tokens per row (default: cuda 2048, cpu 256, tiny 128)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row, not trained on (default: seq-len / 4)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="fixed batch sizes instead of the OOM search")
    p.add_argument("--max-batch", type=int, help="upper end of the batch search (default 64, --quick 8)")
    p.add_argument("--no-bisect", action="store_true", help="only powers of two in the batch search")
    p.add_argument("--repeats", type=int, help="timed steps per measurement after one warm-up (default 3, quick 2)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weights of all three models (default: cuda bfloat16, cpu float32)",
    )
    p.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "sdpa", "eager"])
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument(
        "--no-cached",
        action="store_true",
        help="skip the teacher-cache measurement (build cost, cached BFT step vs SFT, disk per token)",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--cpu-8bit",
        action="store_true",
        help="CPU: run the 8-bit modes through bitsandbytes' CPU backend (bitsandbytes >= 0.48) instead of "
        "skipping lora-8bit and running full-adam8bit with fp32 stand-ins (a check of the code path; "
        "the trainer itself wants CUDA for 8-bit)",
    )
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        help="cap the CUDA allocator (torch.cuda.set_per_process_memory_fraction), e.g. 79 to emulate "
        "an 80 GB H100 on a larger GPU",
    )
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/trainer_{gpu,cpu}[_quick].json)")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.preset = a.preset or ("llama-3.1-8b" if cuda else "tiny" if a.quick else "small")
    a.seq_len = a.seq_len or (2048 if cuda else 128 if a.preset == "tiny" else 256)
    a.prompt_len = a.prompt_len or max(1, a.seq_len // 4)
    if not 1 <= a.prompt_len < a.seq_len:
        p.error(f"--prompt-len must be in [1, seq-len) = [1, {a.seq_len}), got {a.prompt_len}")
    a.max_batch = a.max_batch or (8 if a.quick else 64)
    a.repeats = a.repeats or (2 if a.quick else 3)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    if not cuda and not a.batch_sizes:  # no OOM to catch on CPU (the kernel kills the process): fixed sizes
        a.batch_sizes = [2] if a.quick else [1, 2, 4]
    if a.quick and cuda:
        a.no_bisect = True
    tag = "gpu" if cuda else "cpu"
    a.out = a.out or RESULTS / f"trainer_{tag}{'_quick' if a.quick else ''}.json"
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda needs a CUDA GPU; run --device cpu for the small-scale numbers")
        device = torch.device("cuda", torch.cuda.current_device())
        if args.memory_limit_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total), device)
    llama = dict(PRESETS[args.preset], **_COMMON_LLAMA)
    if args.layers:
        llama["num_hidden_layers"] = args.layers
    mem = Memory(device)
    # bitsandbytes' int8 matmul says so on every call for bf16 inputs (as under from_pretrained(load_in_8bit=True));
    # a warning in older releases, a log record in newer ones
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")
    )

    import peft
    import transformers
    from tqdm.auto import tqdm

    import bft

    results = {}
    bar = tqdm(total=None, desc="trainer bench", unit="trial", dynamic_ncols=True)
    for name in args.modes:
        bar.set_description(f"trainer bench [{name}]")
        results[name] = run_mode(name, args, device, llama, mem, bar)
        r = results[name]
        if r["status"] == "ok":
            ratio = r["bft_vs_sft"]
            line = (
                f"{name}: max batch {r['max_batch_size']}, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB, "
                f"{r['tokens_per_s']:.0f} tok/s"
            )
            if ratio:
                line += f", BFT/SFT {ratio['bft_over_sft']:.3f} at batch {ratio['batch_size']}"
            if r["teacher_cache"]:
                c = r["teacher_cache"]
                line += (
                    f"; cached BFT/SFT {c['cached_over_sft']:.3f} (live {c['live_bft_over_sft']:.3f}), build "
                    f"{c['build_s']:.2f} s, {c['disk_bytes_per_token']:.0f} B/token, break-even "
                    f"{c['break_even_epochs'] if c['break_even_epochs'] is None else round(c['break_even_epochs'], 2)} "
                    "epochs"
                )
            tqdm.write(line)
        else:
            tqdm.write(f"{name}: {r['status']} {r.get('reason', '')}")
    bar.close()

    bnb_version = None
    if importlib.util.find_spec("bitsandbytes") is not None:
        try:
            bnb_version = __import__("bitsandbytes").__version__
        except Exception:
            bnb_version = "import failed"
    payload = {
        "benchmark": "BFT trainer step (one micro-batch + optimizer step) vs plain SFT step: memory and speed",
        "device": device_name(device),
        "device_type": device.type,
        "device_memory_bytes": (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        ),
        "memory_limit_gib": args.memory_limit_gib,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb_version,
        "bft": bft.__version__,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "model": {"preset": args.preset, "llama_config": llama, "dtype": args.dtype},
        "settings": {
            "seq_len": args.seq_len,
            "prompt_len": args.prompt_len,
            "harmful_ratio": HARMFUL_RATIO,
            "cpu_8bit": args.cpu_8bit,
            "repeats": args.repeats,
            "batch_sizes": args.batch_sizes,
            "max_batch": args.max_batch,
            "bisect": not args.no_bisect,
            "attn_implementation": args.attn,
            "gradient_checkpointing": not args.no_gradient_checkpointing,
            "grad_accum": 1,
            "tokens_per_step": "batch_size * seq_len (rows are full, no padding)",
        },
        "memory_metric": mem.metric,
        "sft_baseline": "cross-entropy of the same student on the same batch's valid rows (logits in model dtype, "
        "loss in fp32), same optimizer, clipping and step",
        "goals": {
            "bft_over_sft_max": RATIO_GOAL,
            "cached_bft_over_sft_max": CACHED_RATIO_GOAL,
            "fits_gpu_memory_gib": 80,
        },
        "modes": results,
        "summary": {
            name: (
                {
                    "max_batch_size": r["max_batch_size"],
                    "peak_memory_gib": r["peak_memory_bytes"] / 2**30,
                    "tokens_per_s": r["tokens_per_s"],
                    "tokens_per_s_best": r["tokens_per_s_best"],
                    "tokens_per_cpu_s": r["tokens_per_cpu_s"],
                    "bft_over_sft": r["bft_vs_sft"]["bft_over_sft"] if r["bft_vs_sft"] else None,
                    "bft_over_sft_wall": r["bft_vs_sft"]["bft_over_sft_wall"] if r["bft_vs_sft"] else None,
                    "ratio_batch_size": r["bft_vs_sft"]["batch_size"] if r["bft_vs_sft"] else None,
                    "cached_over_sft": r["teacher_cache"]["cached_over_sft"] if r["teacher_cache"] else None,
                    "cached_build_s": r["teacher_cache"]["build_s"] if r["teacher_cache"] else None,
                    "cached_break_even_epochs": (
                        r["teacher_cache"]["break_even_epochs"] if r["teacher_cache"] else None
                    ),
                    "cached_disk_bytes_per_token": (
                        r["teacher_cache"]["disk_bytes_per_token"] if r["teacher_cache"] else None
                    ),
                }
                if r["status"] == "ok"
                else {"status": r["status"], "reason": r.get("reason")}
            )
            for name, r in results.items()
        },
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    return 0 if all(r["status"] != "does_not_fit" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
