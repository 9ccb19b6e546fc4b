"""CPU benchmark (pytest-benchmark) of one trainer step: BFT vs plain SFT on a tiny random Llama, side by side.

    python -m pytest benchmarks/test_trainer_cpu.py -s

A few seconds: LoRA mode of ``benchmarks/trainer_bench.py`` (same trio builder, same steps: the trainer's
``micro_batch_loss`` + backward + clipping + AdamW step) on the "tiny" preset, batch 2 × 128 tokens, one torch
thread. At this size the loss and the Python overhead weigh far more than in a 7-8B model, so the ratio printed
here is not the 8B number; the CPU numbers of record come from ``python benchmarks/trainer_bench.py --device cpu``
(``benchmarks/results/trainer_cpu.json``). No assertion on time.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import trainer_bench as tb

_seconds: dict[str, float] = {}


@pytest.fixture(scope="module")
def steps_and_batch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: extra threads only spin, badly so on a shared CPU
    args = tb.parse_args(["--device", "cpu", "--quick"])
    llama = dict(tb.PRESETS["tiny"], **tb._COMMON_LLAMA)
    config = tb.make_config(tb.MODES["lora"], args)
    trio = tb.build_random_trio(config, llama, torch.device("cpu"))
    steps = tb.Steps(trio, config)
    batch = tb.synthetic_batch(2, args.seq_len, args.prompt_len, llama["vocab_size"], torch.device("cpu"))
    yield steps, batch
    torch.set_num_threads(threads)
    if len(_seconds) == 2:
        print(
            f"\ntrainer step, tiny Llama, LoRA, CPU: BFT {_seconds['bft'] * 1e3:.1f} ms, SFT "
            f"{_seconds['sft'] * 1e3:.1f} ms, BFT/SFT = {_seconds['bft'] / _seconds['sft']:.2f}"
        )


@pytest.mark.parametrize("kind", ["bft", "sft"])
def test_trainer_step_time(benchmark, steps_and_batch, kind):
    steps, batch = steps_and_batch
    step = getattr(steps, kind)
    times = []

    def timed():
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
    _seconds[kind] = statistics.median(times)
    assert all(torch.isfinite(p).all() for p in steps.params)  # the steps really trained something finite
