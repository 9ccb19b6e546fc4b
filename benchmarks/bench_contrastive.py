"""Throughput of contrastive decoding (two cached forwards per token) vs plain ``generate`` of the aligned model.

Same batch, same prompts, greedy, every row forced to the same number of new tokens (``min_new_tokens``). After a
warm-up of each, the two runs alternate ``--repeats`` times in ABBA order (plain, contrastive, contrastive, plain,
...), so drifts in machine load hit both. tokens/s = batch · new tokens / wall time; the headline ratio is the
ratio of the medians, the paired ratio (median over repeats of plain_time / contrastive_time of the same repeat)
is reported beside it, and so is the ratio of median process CPU times (with one thread, the compute a run
needs whatever else the machine runs; wall time is the headline). The ceiling of the ratio is ~0.5 (two forwards
per token); the target is ≥ 0.45.

The contrastive runs are instrumented (two ``perf_counter`` pairs per step, ~1 µs): each run's wall time is split
into the base model's forward (inside the logits processor), the processor's own work (cache check, masks, the
Eq. 7 formula) and the rest (the aligned model's forward and ``generate``'s loop, i.e. what plain ``generate`` also
does); the JSON ``profile`` holds the medians over repeats and ``notes`` explain the ratio from that split.

    python benchmarks/bench_contrastive.py --model tiny
    python benchmarks/bench_contrastive.py --model smollm2 --batch-size 8 --max-new-tokens 32

Threads: on CPU the default is ``--threads 1``. On a shared machine (other processes on the same cores) PyTorch's
OpenMP threads get preempted at every barrier and one small matmul can take 100× longer than usual; one thread
gives reproducible numbers. ``--threads 0`` keeps PyTorch's default. The thread count is recorded in the JSON.

Writes ``benchmarks/results/contrastive_<model>_<device>.json`` (atomically) with the device name and versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from bft.atomic import atomic_write_json
from bft.decoding import contrastive_generate
from bft.environment import device_name
from bft.hf.chat import render_prompts

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a refrigerator works.",
    "What is the capital of France?",
    "Give me three tips for learning to cook, with a short explanation of each.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I sort a list in Python?",
    "Tell me a joke about computers.",
    "Why is the sky blue?",
]


def load_models(name: str, device: torch.device, tiny_hidden: int, tiny_layers: int):
    """(aligned, base, tokenizer). For real models the base is a copy of the aligned model: speed does not depend on
    the weights (and with identical weights B is empty, so the contrastive output must equal the plain one)."""
    if name == "tiny":
        from bft.hf.testing import tiny_llama_pair

        base, aligned, tok = tiny_llama_pair(seed=0, hidden_size=tiny_hidden, num_layers=tiny_layers)
    else:
        from bft.hf.models import load_model_and_tokenizer

        aligned, tok = load_model_and_tokenizer(name, device=device)
        base = copy.deepcopy(aligned)
    return aligned.to(device).eval(), base.to(device).eval(), tok


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class _Split:
    """Wall-clock split of one contrastive run: time inside the processor's ``__call__`` and inside its base-model
    forward. Wraps the two methods on the class for the duration of a ``with`` block (benchmark only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.processor_s = 0.0
        self.base_forward_s = 0.0
        self.calls = 0

    def __enter__(self):
        from bft.decoding import ContrastiveLogitsProcessor as P

        self._orig = (P.__call__, P._forward)
        call, fwd = self._orig
        split = self

        def timed_call(proc, input_ids, scores):
            sync(split.device)
            t0 = time.perf_counter()
            out = call(proc, input_ids, scores)
            sync(split.device)
            split.processor_s += time.perf_counter() - t0
            split.calls += 1
            return out

        def timed_forward(proc, *a, **k):
            sync(split.device)
            t0 = time.perf_counter()
            out = fwd(proc, *a, **k)
            sync(split.device)
            split.base_forward_s += time.perf_counter() - t0
            return out

        timed_call.__signature__ = __import__("inspect").signature(call)
        P.__call__, P._forward = timed_call, timed_forward
        return self

    def __exit__(self, *exc):
        from bft.decoding import ContrastiveLogitsProcessor as P

        P.__call__, P._forward = self._orig
        return False


class _StubBase(torch.nn.Module):
    """Stands in for the base model in :func:`processor_only`: returns fixed logits and does no compute."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, past_key_values=None, **kwargs):
        import types

        return types.SimpleNamespace(logits=self.logits[: input_ids.shape[0], None], past_key_values=past_key_values)


def processor_only(vocab_size: int, batch_size: int, prompt_len: int, steps: int, device: torch.device) -> float:
    """ms/step of ``ContrastiveLogitsProcessor`` itself (cache check, mask, positions, Eq. 7 over the vocabulary)
    with a stub base model, on fixed scores; process CPU time, best of 5 — the processor's cost free of machine
    noise and of the model."""
    from bft.decoding import ContrastiveLogitsProcessor

    g = torch.Generator().manual_seed(0)
    base = _StubBase(torch.randn(batch_size, vocab_size, generator=g)).to(device)
    scores = torch.randn(batch_size, vocab_size, generator=g).to(device)
    ids = torch.randint(0, vocab_size, (batch_size, prompt_len + steps), generator=g).to(device)
    mask = torch.ones(batch_size, prompt_len, dtype=torch.long, device=device)
    best = float("inf")
    for _ in range(5):
        proc = ContrastiveLogitsProcessor(base, alpha=1.0, attention_mask=mask)
        sync(device)
        t0 = time.process_time() if device.type == "cpu" else time.perf_counter()
        for s in range(steps):
            proc(ids[:, : prompt_len + s], scores)
        sync(device)
        best = min(best, (time.process_time() if device.type == "cpu" else time.perf_counter()) - t0)
    return 1e3 * best / steps


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (bft.hf.testing), 'smollm2', a hub id or a local path")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6, help="timed runs of each (alternating, ABBA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each before timing")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 on CPU, see the module docstring; 0 = PyTorch's default)",
    )
    p.add_argument("--tiny-hidden", type=int, default=256)
    p.add_argument("--tiny-layers", type=int, default=4)
    p.add_argument("--note", action="append", default=[], help="extra text for the JSON notes (repeatable)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--repeats, --batch-size and --max-new-tokens must be >= 1 and --warmup >= 0")

    return args


def _timed_runs(fns: dict, args, device, split_source) -> dict:
    """Warm-up, then ``args.repeats`` ABBA rounds of every function: wall and process-CPU seconds, the last outputs,
    and per contrastive run the (processor, base forward, steps) split."""
    outs = {}
    for label, fn in fns.items():
        for _ in range(args.warmup):
            outs[label] = fn()
    times = {label: [] for label in fns}
    cpu_times = {label: [] for label in fns}  # process CPU time: what a run costs without other processes
    splits = []  # per contrastive run: (processor_s, base_forward_s, steps)
    order = tuple(fns.items())
    with split_source(device) as split:
        for r in range(args.repeats):
            for label, fn in order if r % 2 == 0 else order[::-1]:  # ABBA: drifts hit both
                before = (split.processor_s, split.base_forward_s, split.calls)
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                outs[label] = fn()
                sync(device)
                times[label].append(time.perf_counter() - t0)
                cpu_times[label].append(time.process_time() - c0)
                if label == "contrastive":
                    splits.append(
                        tuple(a - b for a, b in zip((split.processor_s, split.base_forward_s, split.calls), before))
                    )
    return {"outs": outs, "times": times, "cpu_times": cpu_times, "splits": splits}


def _profile(times: dict, splits: list, n: int, proc_only: float, vocab: int) -> tuple[dict, list[str], dict]:
    """Where a contrastive step's time goes (medians), the notes that say it, and the headline ratios."""
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = splits[0][2]
    total_c = med["contrastive"]
    base_fwd = statistics.median(b for _, b, _ in splits)
    proc_overhead = statistics.median(pr - b for pr, b, _ in splits)
    rest = statistics.median(t - pr for t, (pr, _, _) in zip(times["contrastive"], splits))  # aligned + generate
    profile = {
        "what": "medians over the timed contrastive runs",
        "steps": steps,
        "base_forward_s": round(base_fwd, 4),
        "processor_overhead_s": round(proc_overhead, 4),
        "aligned_generate_s": round(rest, 4),
        "ms_per_step": {
            "base_forward": round(1e3 * base_fwd / steps, 3),
            "processor_overhead": round(1e3 * proc_overhead / steps, 3),
            "aligned_generate": round(1e3 * rest / steps, 3),
            "plain_generate": round(1e3 * med["plain"] / n, 3),
        },
        "processor_only_ms_per_step": round(proc_only, 3),
        "processor_only": "the processor alone with a stub base model (no forward), best of 5, process CPU time",
        "fraction_of_contrastive": {
            "base_forward": round(base_fwd / total_c, 4),
            "processor_overhead": round(proc_overhead / total_c, 4),
            "aligned_generate": round(rest / total_c, 4),
        },
    }
    ratio = med["plain"] / med["contrastive"]
    paired = statistics.median(a / b for a, b in zip(times["plain"], times["contrastive"]))
    # the floor: contrastive = plain + one base forward per step; the processor's own work is all that is ours
    floor_ratio = med["plain"] / (med["plain"] + base_fwd)
    notes = [
        (
            f"Contrastive run (median): base-model forward {100 * base_fwd / total_c:.1f}% of the time "
            f"({1e3 * base_fwd / steps:.2f} ms/step), the processor's own work (cache check, mask, position ids, "
            f"Eq. 7 over V={vocab}) {100 * proc_overhead / total_c:.1f}% "
            f"({1e3 * proc_overhead / steps:.3f} ms/step; alone with a stub base model: {proc_only:.3f} ms/step), "
            f"aligned model + generate loop {100 * rest / total_c:.1f}% ({1e3 * rest / steps:.2f} ms/step; plain "
            f"generate: {1e3 * med['plain'] / n:.2f} ms/step)."
        ),
        f"Ratio if the processor cost nothing beyond the base forward: {floor_ratio:.3f} (= plain / (plain + "
        f"base forward)); measured ratio of medians {ratio:.3f}, paired {paired:.3f}.",
    ]
    return profile, notes, {"median": med, "ratio": ratio, "paired": paired}


def main(argv=None) -> int:
    args = _parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    aligned, base, tok = load_models(args.model, device, args.tiny_hidden, args.tiny_layers)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    ids, mask = render_prompts(tok, prompts)
    ids, mask = ids.to(device), mask.to(device)
    n = args.max_new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)

    def plain():
        with torch.no_grad():
            return aligned.generate(input_ids=ids, attention_mask=mask, **gen)

    def contrastive():
        return contrastive_generate(aligned, base, ids, mask, alpha=args.alpha, **gen)

    load_start = loadavg()
    run = _timed_runs({"plain": plain, "contrastive": contrastive}, args, device, _Split)
    load_end = loadavg()
    times, cpu_times, outs = run["times"], run["cpu_times"], run["outs"]
    for out in outs.values():
        assert out.shape == (args.batch_size, ids.shape[1] + n), out.shape
    proc_only = processor_only(int(aligned.config.vocab_size), args.batch_size, int(ids.shape[1]), n, device)
    profile, notes, headline = _profile(times, run["splits"], n, proc_only, int(aligned.config.vocab_size))
    tokens = args.batch_size * n
    med, ratio, paired = headline["median"], headline["ratio"], headline["paired"]
    tps = {k: tokens / v for k, v in med.items()}
    tps_best = {k: tokens / min(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    ratio_cpu = med_cpu["plain"] / med_cpu["contrastive"]
    notes[-1] += f" In process CPU time {ratio_cpu:.3f}."
    if args.model != "tiny":
        same = bool(torch.equal(outs["plain"].cpu(), outs["contrastive"].cpu()))
        notes.append(
            f"base = copy of the aligned model, so B is empty and the outputs must match plain greedy: "
            f"{'they do' if same else 'THEY DO NOT'}."
        )
    notes += args.note
    result = {
        "benchmark": "contrastive_generate vs plain generate (aligned model alone), greedy, same batch",
        "model": args.model,
        "vocab_size": int(aligned.config.vocab_size),
        "num_layers": int(aligned.config.num_hidden_layers),
        "hidden_size": int(aligned.config.hidden_size),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start_end": [load_start, load_end],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": n,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "order": "ABBA (plain, contrastive, contrastive, plain, ...)",
        "alpha": args.alpha,
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "cpu_seconds": {k: [round(x, 4) for x in v] for k, v in cpu_times.items()},
        "cpu_seconds_median": {k: round(v, 4) for k, v in med_cpu.items()},
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "tokens_per_s_best": {k: round(v, 2) for k, v in tps_best.items()},
        "ratio_contrastive_over_plain": round(ratio, 4),
        "ratio_paired_median": round(paired, 4),
        "ratio_best": round(tps_best["contrastive"] / tps_best["plain"], 4),
        "ratio_cpu_time": round(ratio_cpu, 4),
        "target_ratio": 0.45,
        "meets_target": bool(ratio >= 0.45),
        "profile": profile,
        "notes": notes,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tag = os.path.basename(os.path.normpath(args.model)).replace("/", "_")
    path = os.path.join(args.out_dir, f"contrastive_{tag}_{device.type}.json")
    atomic_write_json(path, result, indent=1)
    keys = (
        "model",
        "device_name",
        "torch_threads",
        "tokens_per_s",
        "ratio_contrastive_over_plain",
        "ratio_paired_median",
        "ratio_cpu_time",
    )
    print(json.dumps({k: result[k] for k in keys}))
    print(json.dumps(profile["ms_per_step"]))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
