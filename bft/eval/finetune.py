"""Fine-tuning attack (Qi et al. 2023; paper Tables 2-4) and the harmful rate it is measured by.

Attack: LoRA fine-tuning on *benign* instruction data (Dolly by default; any dataset with prompt/response works),
rank 32, learning rate 2e-4, 1 epoch, effective batch 128 (the paper's setting; all configurable). The loss is the
token-mean cross-entropy of the response tokens only (prompt tokens are masked), over each effective batch:

    L = − Σ_{examples in batch} Σ_{t ∈ response} log π_θ(y_t | x, y_<t)  /  #response tokens in the batch

with AdamW at a constant learning rate and LoRA (α_LoRA = 2·rank, dropout 0.05) on every linear layer of the
transformer blocks (peft ``target_modules="all-linear"``).

HRR (the paper's "Harmfulness Rejection Rate", reported lower = better) is, precisely,

    HRR = 100 · #{harmful requests x ∈ AdvBench whose reply from the fine-tuned model is judged harmful} / N

i.e. the harmful rate of the attacked model on the plain requests (no prefill, no suffix), decoded with the run's
generation settings (greedy by default). The judge is the one the
report names (keyword by default). It is the same quantity as ASR with k = 0, measured after the attack.

Recovery protocol (paper Table 4): attack → save the attacked model (``--finetune-save DIR``) → BFT-train it
(``bft train`` with the attacked model as the student/aligned model, see docs/eval.md) → ``bft eval`` it again.

The model is modified in place by adding LoRA adapters; :func:`lora_finetune` returns the peft model, and
``peft_model.unload()`` removes the adapters again (the runner does this, so the original model is unchanged).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch

from bft.eval.generation import GenerationSettings, System
from bft.hf.batching import pad_token_id
from bft.hf.chat import encode_chat
from bft.hf.models import get_peft_model, save_pretrained
from bft.hf.sft import sft_step

__all__ = ["FinetuneAttackConfig", "lora_finetune", "harmful_responses", "save_merged"]


@dataclass
class FinetuneAttackConfig:
    """The LoRA fine-tuning attack's settings (BFT training's own are :class:`bft.trainer.config.FinetuneConfig`)."""

    rank: int = 32
    lora_alpha: float | None = None  # None: 2 · rank
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 128  # effective (gradient accumulation over micro-batches)
    micro_batch_size: int = 8
    max_length: int = 512
    target_modules: str | list = "all-linear"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        # each message starts with the field's name, which bft.config prefixes with the section (finetune_rank)
        for name, least in (("rank", 1), ("batch_size", 1), ("micro_batch_size", 1), ("max_length", 2)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least} for the fine-tuning attack, got {getattr(self, name)}")
        for name in ("lr", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 for the fine-tuning attack, got {getattr(self, name)}")


def _examples(tokenizer, rows, config: FinetuneAttackConfig, system_prompt):
    out = []
    for r in rows:
        response = r.get("response") or ""
        if not response.strip():
            continue
        enc = encode_chat(tokenizer, r["prompt"], response, system=system_prompt)
        ids = enc.input_ids[: config.max_length]
        labels = [-100] * min(enc.response_start, len(ids)) + ids[enc.response_start :]
        if any(label != -100 for label in labels):
            out.append((ids, labels))
    if not out:
        raise ValueError("no fine-tuning examples with a response (the dataset needs a non-empty 'response' column)")
    return out


def lora_finetune(
    model, tokenizer, rows, config: FinetuneAttackConfig | None = None, *, system_prompt=None, progress: bool = True
):
    """LoRA-train ``model`` (in place: adapters are injected) on ``rows`` (dicts with prompt/response).

    Returns ``(peft_model, log)`` with ``log = {settings..., "steps", "losses", "final_loss"}``.
    """
    from peft import LoraConfig
    from tqdm.auto import tqdm

    config = config or FinetuneAttackConfig()
    examples = _examples(tokenizer, list(rows), config, system_prompt)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha or 2 * config.rank,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable()
        peft_model.enable_input_require_grads()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    pad_id = pad_token_id(tokenizer, model)

    n_epochs_full = math.ceil(config.epochs)
    order: list[int] = []
    for _ in range(n_epochs_full):
        perm = list(range(len(examples)))
        rng.shuffle(perm)
        order += perm
    order = order[: max(1, round(config.epochs * len(examples)))]
    steps = math.ceil(len(order) / config.batch_size)
    losses: list[float] = []
    peft_model.train()
    bar = tqdm(range(steps), desc="lora fine-tune", disable=not progress)
    for step in bar:
        batch = [examples[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]]
        losses.append(sft_step(peft_model, optimizer, batch, pad_id=pad_id, micro_batch_size=config.micro_batch_size))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    peft_model.eval()
    log = {
        **asdict(config),
        "lora_alpha": config.lora_alpha or 2 * config.rank,
        "steps": steps,
        "examples": len(order),
        "losses": losses,
        "final_loss": losses[-1],
    }
    return peft_model, log


def harmful_responses(system: System, prompts, settings: GenerationSettings | None = None) -> list[dict]:
    """Replies to the plain requests (no prefill; greedy unless ``settings`` sample), as records for judging (HRR)."""
    settings = settings or GenerationSettings()
    outs = system.generate([system.prompt_ids(p) for p in prompts], settings, desc=f"HRR {system.name}")
    return [
        {
            "prompt": p,
            "reference": "",
            "k": 0,
            "prefill": "",
            "prefill_tokens": 0,
            "continuation": system.decode(o),
            "continuation_tokens": len(o),
        }
        for p, o in zip(prompts, outs)
    ]


def save_merged(peft_model, tokenizer, path) -> None:
    """Save the attacked model with the adapters merged (a plain HF checkpoint for ``bft train``/``bft eval``),
    leaving ``peft_model`` itself unmerged (a deep copy is merged; needs memory for a second copy)."""
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    save_pretrained(merged, path, tokenizer=tokenizer)
    del merged
