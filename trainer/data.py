"""Training data: chat-formatted harmful and utility examples, mixed per batch at a fixed harmful ratio.

Each example is one (prompt, response) turn encoded with :func:`bft.hf.chat.encode_chat`. The model's hidden state at
position t predicts token t + 1, so the rows that the loss scores (``valid``) are the positions
``response_start - 1 ≤ t ≤ len - 2``: the last prompt token (predicting the first response token) through the
second-to-last token (predicting the end-of-turn token). ``harmful`` marks every position of a harmful example;
the loss applies the completion penalty on ``valid & harmful`` rows and the KL on all valid rows.

Batch ``i`` (counted over the whole run, across epochs) holds ``n_h(i) = ⌊(i+1)·B·r⌋ − ⌊i·B·r⌋`` harmful rows and
``B − n_h(i)`` utility rows (B = batch size, r = harmful ratio), so the ratio is exact over any run of batches
and the rows of batch i are a pure function of ``(seed, i)``: each stream is read in order through a fresh seeded
permutation per pass. The data position of a run is therefore a single integer — the number of batches consumed —
which makes resuming exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bft.hf.batching import pad_batch, pad_token_id
from bft.hf.chat import encode_chat


@dataclass(frozen=True)
class Example:
    """One encoded chat turn."""

    input_ids: tuple[int, ...]
    response_start: int
    harmful: bool


def encode_examples(tokenizer, pairs, *, harmful: bool, max_length: int, system: str | None = None):
    """Encode (prompt, response) pairs; responses longer than ``max_length`` allows are cut at the end.

    Returns ``(examples, skipped)``: an example whose prompt alone leaves no room for a response token is skipped
    (there would be nothing to score).
    """
    examples, skipped = [], 0
    for prompt, response in pairs:
        encoding = encode_chat(tokenizer, prompt, response, system=system)
        ids = encoding.input_ids[:max_length]
        if encoding.response_start >= len(ids):
            skipped += 1
            continue
        examples.append(Example(tuple(ids), encoding.response_start, harmful))
    return examples, skipped


def _stream_permutation(n: int, seed: int, stream: int, epoch: int) -> list[int]:
    """Order of pass ``epoch`` over a stream of ``n`` items; a function of its arguments only."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + stream * 7919 + epoch) % (2**63))
    return torch.randperm(n, generator=generator).tolist()


class MixedBatches:
    """Deterministic, random-access batches mixing two example streams at a fixed ratio.

    ``batches[i]`` is a dict of tensors for global batch index ``i`` (any i ≥ 0; streams wrap around, reshuffled
    each pass):

        input_ids       [B, L] int64, right-padded with ``pad_id``
        attention_mask  [B, L] int64
        valid           [B, L] bool, rows whose next token is a response token
        harmful         [B, L] bool, every position of a harmful example
        n_tokens        int, sum of the attention mask
    """

    HARMFUL, UTILITY = 0, 1

    def __init__(self, harmful, utility, *, batch_size: int, harmful_ratio: float, seed: int, pad_id: int):
        if not 0.0 <= harmful_ratio <= 1.0:
            raise ValueError(f"harmful_ratio must be in [0, 1], got {harmful_ratio}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if harmful_ratio > 0 and not harmful:
            raise ValueError(f"harmful_ratio={harmful_ratio} needs harmful examples, but there are none")
        if harmful_ratio < 1 and not utility:
            raise ValueError(f"harmful_ratio={harmful_ratio} needs utility examples, but there are none")
        self.harmful = list(harmful)
        self.utility = list(utility)
        self.batch_size = batch_size
        self.ratio = harmful_ratio
        self.seed = seed
        self.pad_id = pad_id
        self._perms: dict[tuple[int, int], list[int]] = {}

    def harmful_before(self, index: int) -> int:
        """Harmful rows in batches 0 .. index-1: ⌊index·B·r⌋ (the epsilon absorbs float error in B·r)."""
        return math.floor(index * self.batch_size * self.ratio + 1e-9)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per pass over the harmful set (over the utility set when the ratio is 0)."""
        if self.ratio > 0:
            return max(1, math.ceil(len(self.harmful) / (self.batch_size * self.ratio) - 1e-9))
        return max(1, math.ceil(len(self.utility) / self.batch_size))

    def _item(self, stream: int, position: int) -> Example:
        items = self.harmful if stream == self.HARMFUL else self.utility
        epoch, offset = divmod(position, len(items))
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:  # only the current pass or two are ever read
                self._perms.clear()
            self._perms[key] = _stream_permutation(len(items), self.seed, stream, epoch)
        return items[self._perms[key][offset]]

    def examples(self, index: int) -> list[Example]:
        if index < 0:
            raise IndexError(index)
        h0, h1 = self.harmful_before(index), self.harmful_before(index + 1)
        u0 = index * self.batch_size - h0
        rows = [self._item(self.HARMFUL, p) for p in range(h0, h1)]
        rows += [self._item(self.UTILITY, p) for p in range(u0, u0 + self.batch_size - (h1 - h0))]
        return rows

    def __getitem__(self, index: int) -> dict:
        return collate(self.examples(index), self.pad_id)


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a list of examples into the tensors described in :class:`MixedBatches`."""
    input_ids, attention_mask = pad_batch([e.input_ids for e in examples], pad_id, side="right")
    valid = torch.zeros(input_ids.shape, dtype=torch.bool)
    harmful = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        valid[row, e.response_start - 1 : n - 1] = True  # hidden state t predicts token t + 1
        harmful[row, :n] = e.harmful
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "valid": valid,
        "harmful": harmful,
        "n_tokens": int(attention_mask.sum()),
    }


def load_pairs(name_or_path: str, *, split=None, limit=None, seed: int = 0, columns=None, role: str):
    """(prompt, response) pairs from :func:`bft.hf.data.load`, with errors that name the dataset and its role."""
    from bft.hf.data import load

    try:
        dataset = load(name_or_path, split=split, limit=limit, seed=seed, columns=columns)
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        # A named dataset whose offline package is missing falls back to the Hub; when that fails too (offline
        # machine), the Hub error alone hides the fix, so name the package that provides the offline copy.
        try:
            load(name_or_path, split=split, limit=limit, seed=seed, columns=columns, source="offline")
        except FileNotFoundError as offline_error:
            raise FileNotFoundError(
                f"the {role} dataset {name_or_path!r} is not available: {offline_error}; the "
                f"online fallback failed too: {error}"
            ) from error
        except (OSError, ValueError):  # no offline copy exists for this name (dolly, a Hub id, ...)
            pass
        raise
    if len(dataset) == 0:
        raise ValueError(f"the {role} dataset {name_or_path!r} is empty (split={split!r}, limit={limit!r})")
    prompts = list(dataset["prompt"])
    responses = list(dataset["response"]) if "response" in dataset.column_names else [""] * len(prompts)
    if role == "utility" and not any(responses):
        # the KL on utility rows is computed on the response tokens: without responses there is nothing to distil
        raise ValueError(
            f"the utility dataset {name_or_path!r} has no responses (columns: {dataset.column_names}); "
            "give one with a response column, or map it with data.utility_columns, e.g. "
            "{prompt: question, response: answer}"
        )
    return [(p, r or "") for p, r in zip(prompts, responses)]


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    system=None,
    batch_size=8,
    device=None,
    progress: bool = True,
) -> list[str]:
    """Greedy responses of ``model`` to chat-formatted ``prompts`` (used to let the base model write the harmful
    responses). Left-padded batches; decoding stops at the tokenizer's end-of-turn / eos token."""
    from tqdm.auto import tqdm

    from bft.hf.chat import end_of_turn_id

    device = device or next(model.parameters()).device
    stop = end_of_turn_id(tokenizer)
    pad_id = pad_token_id(tokenizer)
    out: list[str] = []
    was_training = model.training
    model.eval()
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating harmful responses", disable=not progress):
        encoded = [encode_chat(tokenizer, p, system=system).input_ids for p in prompts[start : start + batch_size]]
        input_ids, attention_mask = pad_batch(encoded, pad_id, side="left")
        length = input_ids.shape[1]
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=pad_id,
        )
        for row in generated[:, length:].tolist():
            if stop in row:
                row = row[: row.index(stop)]
            out.append(tokenizer.decode([t for t in row if t != pad_id], skip_special_tokens=True))
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the run's examples, as the trainer and the teacher cache (trainer/cache.py) both build them


def load_training_pairs(config):
    """(harmful pairs, utility pairs) of a config, before any tokenizer or model is loaded."""
    d, seed = config.data, config.train.seed
    harmful = (
        load_pairs(
            d.harmful,
            split=d.harmful_split,
            limit=d.harmful_limit,
            seed=seed,
            columns=d.harmful_columns,
            role="harmful",
        )
        if d.harmful_ratio > 0
        else []
    )
    utility = (
        load_pairs(
            d.utility,
            split=d.utility_split,
            limit=d.utility_limit,
            seed=seed,
            columns=d.utility_columns,
            role="utility",
        )
        if d.harmful_ratio < 1
        else []
    )
    if d.harmful_response == "dataset" and harmful and not any(r for _, r in harmful):
        raise ValueError(
            f"the harmful dataset {d.harmful!r} has no responses; set data.harmful_response: generate "
            "to let the base model write them, or give a dataset with a response column"
        )
    return harmful, utility


def encode_training_examples(config, tokenizer, harmful_pairs, utility_pairs):
    """(harmful examples, utility examples) encoded with the chat template, with a warning for skipped ones."""
    import warnings

    d = config.data
    harmful, skipped_h = encode_examples(
        tokenizer, harmful_pairs, harmful=True, max_length=d.max_length, system=d.system
    )
    utility, skipped_u = encode_examples(
        tokenizer, utility_pairs, harmful=False, max_length=d.max_length, system=d.system
    )
    for role, kept, skipped in (("harmful", harmful, skipped_h), ("utility", utility, skipped_u)):
        if skipped:
            warnings.warn(
                f"{skipped} {role} examples skipped: their prompt fills data.max_length={d.max_length}", stacklevel=3
            )
        if skipped and not kept:
            raise ValueError(f"every {role} example is longer than data.max_length={d.max_length}; raise it")
    return harmful, utility


def generated_harmful_pairs(config, base, tokenizer, pairs, cache, *, accelerator=None, progress: bool = True):
    """Harmful responses written by the base model itself (greedy), kept in the JSON-lines file ``cache`` so that a
    resumed run (and a teacher cache) uses the very same data. With ``base=None`` the file must exist already."""
    import json
    from pathlib import Path

    from bft.atomic import atomic_write_text

    cache = Path(cache)
    prompts = [p for p, _ in pairs]
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not cache.is_file():
        if base is None:
            raise FileNotFoundError(f"{cache} (the base model's harmful responses) is missing")
        device = accelerator.device if accelerator is not None else None
        responses = generate_responses(
            base,
            tokenizer,
            prompts,
            max_new_tokens=config.data.generate_max_new_tokens,
            system=config.data.system,
            batch_size=config.data.batch_size,
            device=device,
            progress=progress,
        )
        lines = [json.dumps({"prompt": p, "response": r}) for p, r in zip(prompts, responses)]
        atomic_write_text(cache, "\n".join(lines) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    with open(cache) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if [r["prompt"] for r in rows] != prompts:
        raise ValueError(f"{cache} was generated for other prompts (data config changed?); delete it to regenerate")
    kept = [(r["prompt"], r["response"]) for r in rows if r["response"].strip()]
    if not kept:
        raise ValueError(
            f"the base model generated only empty harmful responses ({cache}); raise "
            "data.generate_max_new_tokens or give a dataset with responses"
        )
    return kept
