"""Load distributed (sharded) checkpoints into any layout, including one process.

Expert stacks are stored with their global (E, …) shape (see fsdp_ep), so a checkpoint
written under one (dp, ep) layout loads under any other; Lightning does that when a
sharded run resumes. `load_sharded_into` serves single-process inference.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn


def load_sharded_into(module: nn.Module, path: str | Path, prefix: str = "state_dict") -> nn.Module:
    """Fill an unsharded module's weights from a sharded checkpoint folder, in this process.

    `prefix` is the checkpoint's top-level key of the model state: "state_dict" for the
    folders Lightning's FSDPExpertParallelStrategy writes (keys of the LightningModule,
    e.g. "model.vit.blocks.1.mlp.experts.w1_EDF"). Pass the LightningModule (or a module
    with the same keys). Returns the module.
    """
    state = {prefix: module.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    module.load_state_dict(state[prefix])
    return module
