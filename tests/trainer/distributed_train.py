"""Run ``bft.trainer.train.train`` in each process of a ``torchrun`` launch (used by test_distributed.py beside it).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer/distributed_train.py \
        {ddp,fsdp} CONFIG [--resume] [key=value ...]

On CPU, accelerate turns a multi-process launch into DDP over gloo and ignores an FSDP request (its FSDP path is
for accelerators). ``fsdp`` therefore switches accelerate's state to FSDP2 right after the trainer creates its
Accelerator — the same state that ``accelerate launch`` with an FSDP2 config gives on GPUs — so that the trainer's
FSDP code (sharded student, gathered checkpoints, final save) runs here for real, with gloo. The auto-wrap policy
names no classes: it must find the decoder layers through BFTStudent, as it does for a user's `accelerate config`.
"""

from __future__ import annotations

import sys


def use_fsdp2_on_cpu() -> None:
    import accelerate
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = accelerate.Accelerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # AcceleratorState re-reads PartialState whenever it is built again: set the type in both
        PartialState().distributed_type = DistributedType.FSDP
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        if state.mixed_precision != "no":  # what accelerate does for a plugin given up front
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin

    accelerate.Accelerator.__init__ = init


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    mode, config_name, *rest = argv
    resume = "--resume" in rest
    overrides = [r for r in rest if r != "--resume"]
    if mode == "fsdp":
        use_fsdp2_on_cpu()
    elif mode != "ddp":
        raise SystemExit(f"mode must be ddp or fsdp, got {mode!r}")
    from bft.trainer.config import load_config
    from bft.trainer.train import ending_process_group, train

    with ending_process_group():  # as a user's script should: see its docstring
        train(load_config(config_name, overrides), resume=resume, progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
