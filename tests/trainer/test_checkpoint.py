"""bft.trainer.checkpoint: atomic saves, and one process's checkpoint laid out as distributed ones."""

from __future__ import annotations

import pytest
import torch

from bft.loss import BFTLoss


def test_interrupted_save_never_loses_a_checkpoint(tmp_path, monkeypatch):
    """A crash while a checkpoint is written leaves the previous one complete and listed; the half-written one is
    invisible and cleaned up by the next save; old checkpoints are pruned only once the new one is in place."""
    from bft.trainer import checkpoint as ckpt

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))

    def one_step():
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    one_step()
    saved_weight = model.weight.detach().clone()
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 1}, keep=1)
    after_save_rng = torch.rand(1)
    one_step()

    real_save = torch.save

    def crash_on_optimizer(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            raise KeyboardInterrupt  # e.g. Ctrl-C or a preemption in the middle of the save
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(
            tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 2}, keep=1
        )
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]  # keep=1, yet step 1 survived
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())

    # resuming from it restores weights, optimizer, scheduler and RNG
    state = ckpt.load_checkpoint(
        ckpt.latest_checkpoint(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler
    )
    assert state["step"] == 1 and torch.equal(model.weight, saved_weight)
    assert scheduler.last_epoch == 1 and torch.equal(torch.rand(1), after_save_rng)

    one_step()
    ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 2}, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]  # stale temp removed


def test_one_process_checkpoint_has_the_layout_of_distributed_ones():
    """One process reads the state directly; several go through torch.distributed.checkpoint. Both must write the
    same dicts (names, tensors, param groups), so a checkpoint resumes under either, and restoring them round-trips."""
    from bft.trainer import checkpoint as ckpt
    from bft.trainer.config import load_config
    from bft.trainer.modeling import BFTStudent, add_lora
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from bft.hf.testing import tiny_llama_pair

    def student_and_optimizer(seed):
        torch.manual_seed(seed)
        _, aligned, _ = tiny_llama_pair(seed=0)
        student = BFTStudent(add_lora(aligned, load_config("tiny-cpu")), BFTLoss(), 102)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        return student, optimizer

    student, optimizer = student_and_optimizer(1)
    mine_model, mine_optim = ckpt.gather_training_state(student, optimizer)
    dcp_model, dcp_optim = get_state_dict(student, optimizer, options=ckpt._state_dict_options(cpu_offload=True))
    assert mine_model.keys() == dcp_model.keys() and all(torch.equal(mine_model[k], dcp_model[k]) for k in mine_model)
    assert mine_optim["param_groups"] == dcp_optim["param_groups"]
    assert mine_optim["state"].keys() == dcp_optim["state"].keys()
    for name, per_param in mine_optim["state"].items():
        for key, value in per_param.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(dcp_optim["state"][name][key])), (name, key)

    other, other_optimizer = student_and_optimizer(2)  # different adapters and moments
    ckpt.restore_training_state(other, other_optimizer, mine_model, mine_optim)
    again_model, again_optim = ckpt.gather_training_state(other, other_optimizer)
    assert all(torch.equal(again_model[k], mine_model[k]) for k in mine_model)
    for name, per_param in mine_optim["state"].items():
        for key, value in per_param.items():
            assert torch.equal(torch.as_tensor(again_optim["state"][name][key]), torch.as_tensor(value)), (name, key)
