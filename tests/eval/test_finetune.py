"""bft.eval.finetune: the LoRA fine-tuning attack on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from bft.eval.generation import GenerationSettings, System
from bft.hf.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_finetune_lowers_loss_and_unloads():
    from bft.eval.finetune import FinetuneAttackConfig, harmful_responses, lora_finetune

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"prompt": "Say hi", "response": "hi hi hi"}] * 8
    cfg = FinetuneAttackConfig(rank=4, lr=5e-2, epochs=3, batch_size=4, micro_batch_size=2)
    peft_model, log = lora_finetune(model, tok, rows, cfg, progress=False)
    assert log["steps"] == 6 and log["losses"][-1] < log["losses"][0]
    recs = harmful_responses(System("attacked", peft_model, tok), ["Say hi"], GenerationSettings(max_new_tokens=3))
    assert recs[0]["k"] == 0 and recs[0]["prefill"] == ""
    restored = peft_model.unload()
    after = restored.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="response"):
        lora_finetune(tiny_llama(tok), tok, [{"prompt": "x", "response": ""}], cfg, progress=False)
