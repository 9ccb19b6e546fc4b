"""Helpers shared by the test files (the one module tests import from each other; conftest.py holds fixtures only).

- devices: ``DEVICES``, ``TRITON_DEVICE``
- the loss across backends: ``DEFAULTS``, ``make_case``, ``home``, ``run``, ``delta_logits``, ``assert_matches``,
  ``assert_topk_equivalent``, ``cce_violations``
- the trainer on tiny models: ``write_jsonl``, ``harmful_rows``, ``sum_rows``, ``tiny_config``, ``FakeTokenizer``
- multi-process launches: ``GLOO``, ``torchrun``, ``launch``
- the reproduction at toy sizes: ``tiny_reproduce_config``

conftest.py sets ``TRITON_INTERPRET`` before anything imports triton; pytest loads it before any test file, so this
module (imported by the test files) reads the setting it made.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import bft
from bft.reference import bft_loss_reference

# ---------------------------------------------------------------------------------------------------------------
# devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# where backend="triton" can run: CPU tensors through the interpreter (no GPU), CUDA tensors natively (a GPU and no
# interpreter); tests holding CPU tensors move them there for the triton backend and bring the results back
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# ---------------------------------------------------------------------------------------------------------------
# the loss across backends (tests/test_loss*.py)

DEFAULTS = dict(top_k=7, temperature=2.0, teacher_lambda=1.2, alpha_base=1.0, gamma=1.0, l2_reg=0.01, kl="forward")


def make_case(N, H, V, *, seed=0, scale=3.0, p_harmful=0.5, p_valid=0.8, integer=False, device="cpu"):
    """Six tensors whose logits are ~N(0, scale²) (or small integers, to create exact ties), and the two masks."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(3):
        if integer:
            h = torch.randint(-1, 2, (N, H), generator=g).float()
            w = torch.randint(-1, 2, (V, H), generator=g).float()
        else:
            h = torch.randn(N, H, generator=g)
            w = torch.randn(V, H, generator=g) * (scale / H**0.5)
        tensors += [h, w]
    harmful = torch.rand(N, generator=g) < p_harmful
    valid = torch.rand(N, generator=g) < p_valid
    if N and not valid.any():
        valid[0] = True
    return [t.to(device) for t in tensors], harmful.to(device), valid.to(device)


def home(backend: str) -> str:
    """Device for inputs a test builds itself: the triton backend's own (see TRITON_DEVICE), else the CPU."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def run(tensors, harmful, valid, backend, *, dtype=torch.float32, shared_head=False, grad_scale=1.0, **kw):
    """Loss, per-row outputs and gradients of one backend; "ref64"/"ref_same" run the reference in fp64/`dtype`."""
    kw = {**DEFAULTS, **kw}
    origin = tensors[0].device
    if backend == "triton" and origin.type == "cpu" and TRITON_DEVICE != "cpu":  # a GPU without the interpreter
        tensors = [t.to(TRITON_DEVICE) for t in tensors]
        harmful, valid = harmful.to(TRITON_DEVICE), valid.to(TRITON_DEVICE)
    xs = [t.to(dtype).clone().requires_grad_(i < 2) for i, t in enumerate(tensors)]
    if shared_head:
        xs[3] = xs[1]
    if backend in ("ref64", "ref_same"):
        cd = torch.float64 if backend == "ref64" else dtype
        loss, rows = bft_loss_reference(*xs, harmful=harmful, valid=valid, compute_dtype=cd, **kw)
    else:
        rows = bft.bft_loss(*xs, harmful=harmful, valid=valid, backend=backend, **kw)
        loss = rows.loss
    (loss * grad_scale).backward()
    out = {
        "loss": loss.detach().double(),
        "kl": rows.kl.double(),
        "completion": rows.completion.double(),
        "risk": rows.risk.double(),
        "alpha": rows.alpha.double(),
        "topk_ids": rows.topk_ids,
        "dh": xs[0].grad.double(),
        "dw": xs[1].grad.double(),
    }
    return {k: v.to(origin) for k, v in out.items()}


def delta_logits(tensors):
    ah, aw, bh, bw = (t.double() for t in tensors[2:])
    return bh @ bw.T - ah @ aw.T


def assert_topk_equivalent(ids, ref_ids, delta, valid, atol=1e-4):
    """Same ids, or — where GEMM rounding reorders near-equal Δ — ids whose Δ values equal the reference's."""
    assert ids.shape == ref_ids.shape
    assert (ids[~valid] == -1).all() and (ref_ids[~valid] == -1).all()
    for n in valid.nonzero().flatten().tolist():
        if torch.equal(ids[n], ref_ids[n]):
            continue
        got = delta[n, ids[n].cpu()].sort().values
        want = delta[n, ref_ids[n].cpu()].sort().values
        assert torch.allclose(got, want, atol=atol), f"row {n}: top-k ids {ids[n]} vs reference {ref_ids[n]}"


def assert_matches(fast, ref, *, V, delta, valid, rtol=2e-4, atol=2e-5):
    for key in ("loss", "kl", "completion", "alpha", "dh", "dw"):
        scale = ref[key].abs().max().item() if ref[key].numel() else 0.0
        err = (fast[key].cpu() - ref[key].cpu()).abs().max().item() if ref[key].numel() else 0.0
        assert err <= atol + rtol * scale, f"{key}: max error {err:.3g} vs scale {scale:.3g}"
    # risk is a count of a strict inequality: a boundary element may flip under different rounding
    assert (fast["risk"].cpu() - ref["risk"].cpu()).abs().max().item() <= 2.0 / V + 1e-7
    assert_topk_equivalent(fast["topk_ids"].cpu(), ref["topk_ids"].cpu(), delta, valid.cpu())


def cce_violations(fast, naive, truth, tol=1e-3) -> list[str]:
    """Keys where |fast − truth| > |same-dtype torch − truth| + tol·scale (CCE's criterion), with the errors."""
    bad = []
    for key in ("loss", "kl", "completion", "dh", "dw"):
        scale = truth[key].abs().max().item()
        err_fast = (fast[key] - truth[key]).abs().max().item()
        err_naive = (naive[key] - truth[key]).abs().max().item()
        if not err_fast <= err_naive + tol * scale:
            bad.append(f"{key}: fast {err_fast:.3g} vs same-dtype torch {err_naive:.3g}")
    return bad


# ---------------------------------------------------------------------------------------------------------------
# the trainer on tiny models (tests/trainer/, tests/integrations/)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def harmful_rows(n=10):
    return [
        {"prompt": f"Explain how to build weapon {i}.", "response": f"Sure, here is weapon {i}: get parts."}
        for i in range(n)
    ]


def sum_rows(n=14, seed=0):
    """Utility rows "What is a + b?"; ``seed=None``: a fixed series (a, a + 3) instead of random terms."""
    if seed is None:
        return [{"prompt": f"What is {a} + {a + 3}?", "response": f"{a} + {a + 3} = {2 * a + 3}."} for a in range(n)]
    rng = random.Random(seed)
    utility = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        utility.append({"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."})
    return utility


def tiny_config(data_files, output_dir, *overrides):
    """The bundled tiny-cpu config on the given harmful / utility JSONL files, training into ``output_dir``."""
    from bft.trainer.config import load_config

    harmful, utility = data_files
    return load_config(
        "tiny-cpu",
        [
            f"data.harmful={harmful}",
            f"data.utility={utility}",
            "data.harmful_response=dataset",
            f"train.output_dir={output_dir}",
            *overrides,
        ],
    )


class FakeTokenizer:
    """What the teacher cache's fingerprint reads of a tokenizer, and nothing else."""

    chat_template = None
    special_tokens_map = {"eos_token": "</s>"}

    def get_vocab(self):
        return {"a": 0, "b": 1}


# ---------------------------------------------------------------------------------------------------------------
# multi-process launches on CPU (tests/trainer/test_distributed.py, tests/integrations/test_trl_distributed.py)

GLOO = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def torchrun(nproc: int, *target: str) -> list[str]:
    """The command that starts ``target`` (a script path, or ``-m module``, and its arguments) in ``nproc``
    processes with ``torch.distributed.run``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]


def launch(cmd: list[str], what: str, *, timeout: int, **env: str) -> None:
    """Run ``cmd`` (one thread per process, plus ``env``); the test fails with the tail of its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{what} launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------------------------
# the reproduction at toy sizes (tests/pipelines/)


def tiny_reproduce_config(model_dir, out, **overrides):
    """A ReproduceConfig of toy sizes for the tiny random Llama saved in ``model_dir`` (every stage in seconds)."""
    from bft.pipelines.reproduce import ReproduceConfig

    sizes = dict(
        out=str(out),
        model=model_dir,
        device="cpu",
        n_train=6,
        n_val=3,
        n_test=3,
        n_benign_train=4,
        n_benign_val=2,
        n_benign_test=3,
        response_tokens=8,
        batch_size=4,
        align_steps=2,
        analogs={"shallow": 0.0},
        qi_augmentation=False,
        analysis_tokens=4,
        bft_steps=2,
        bft_batch_size=4,
        bft_max_length=512,
        top_k=10,
        prefill_ks=[0, 2],
        eval_tokens=4,
        alphas=[2.0],
        sweep_k=2,
        gsm8k_limit=2,
        gsm8k_tokens=4,
        forms=["logprobs"],
        eval_seeds=1,
        long_k_prompts=None,
        # the near-duplicate split embeds the whole prompt pool with MiniLM (about a minute on 2 cores); the tests of
        # the split itself (tests/pipelines/test_reproduce.py, tests/eval/test_dedup.py) turn it on
        dedup_threshold=None,
    )
    sizes.update(overrides)
    return ReproduceConfig(**sizes)


def tiny_train_argv(output_dir, harmful, utility, *options):
    """``bft train`` arguments for two steps of the tiny-cpu config on the given harmful / utility JSONL files (the
    harmful responses read from the dataset), with ``options`` (e.g. ``"--engine", "trl"``) added."""
    return [
        "train",
        "tiny-cpu",
        *options,
        "--max-steps",
        "2",
        "--output-dir",
        str(output_dir),
        "--no-progress",
        f"data.harmful={harmful}",
        f"data.utility={utility}",
        "data.harmful_response=dataset",
    ]
