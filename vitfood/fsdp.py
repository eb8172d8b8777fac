"""--fsdp: PyTorch's FSDP2 (`fully_shard`) over the processes of torchrun. Each rank keeps its shard of the
weights, gradients and AdamW moments; a block's full weights exist only while it computes. A sharded run's
checkpoint is written by every rank at once with torch.distributed.checkpoint (DCP) and can be resumed on
any number of processes; the weights are gathered into one ordinary transformers model for export.

What a plain run keeps in one file (model.safetensors, the optimizer in training_state.pt) a sharded run
keeps in the checkpoint's `sharded/` folder: one file per rank and DCP's `.metadata`.
"""

import contextlib
import os
import sys
import warnings

import torch

from vitfood.common import UserError

# torch.distributed.fsdp and .checkpoint are imported where used: 0.65 s that a plain run, predict and the
# checks of the options do not pay

SHARDED_DIR = "sharded"  # a checkpoint's folder of DCP files

# what a sharded run cannot do yet, each with why, said in one line before anything is loaded
REFUSED = (
    ("ema_decay", "--ema-decay", "the EMA would be a second full copy of the weights on every rank"),
    ("lora_rank", "--lora-rank", "LoRA trains a few adapters: DDP (torchrun without --fsdp) fits it"),
    ("freeze_backbone", "--freeze-backbone", "a linear probe trains the head alone: DDP fits it"),
    ("freeze_epochs", "--freeze-epochs", "what trains would change midway inside the sharded units"),
    ("freeze_steps", "--freeze-steps", "what trains would change midway inside the sharded units"),
    ("compile", "--compile", "not tested with the sharded units here"),
)


def check(cfg):
    """The options --fsdp refuses, in one line."""
    if not cfg.fsdp:
        return
    for field, flag, why in REFUSED:
        if getattr(cfg, field):
            raise UserError(f"--fsdp with {flag}: {why}; drop one of them")
    if cfg.batch_size == "auto":
        raise UserError("--fsdp with --batch-size auto: the probe measures a whole model on one device; give "
                        "--batch-size")


def shard(model, precision, device):
    """Shard `model` in place: every block its family names as not to be split (transformers'
    `_no_split_modules`: ViTLayer, ViTEmbeddings, ...) an FSDP unit of its own, the rest the root's. With
    bf16 or fp16 the units gather their weights in that type (half the traffic), take their inputs in it (so
    the activations between blocks are bf16/fp16, where a plain run's autocast leaves the residual stream in
    fp32) and reduce gradients in fp32; inside a unit autocast still runs its fp32 ops (softmax, norms) in fp32.
    A unit holding BatchNorm (ResNet, ...) keeps fp32 weights, as its running statistics are: autocast alone
    decides its precision, as in a plain run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))  # the run's device, not the default
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    batch_norm = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    policy_of = lambda unit: MixedPrecisionPolicy() if any(isinstance(m, batch_norm) for m in unit.modules()) else policy
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"--fsdp: {type(model).__name__} names no blocks to shard (transformers' _no_split_modules)")
    for block in reversed(blocks):  # innermost first, should a family name a block inside another
        fully_shard(block, mesh=mesh, mp_policy=policy_of(block))
    fully_shard(model, mesh=mesh, mp_policy=policy_of(model))
    return model


def is_sharded(model):
    if "torch.distributed.fsdp" not in sys.modules:  # nothing was sharded in this process
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def is_sharded_checkpoint(path):
    return os.path.isdir(os.path.join(path, SHARDED_DIR))


def save(folder, model, optimizer):
    """Every rank: its shards of the weights and of the optimizer state into `folder`/sharded, side by side.
    DCP returns once every rank's file is written and synced and rank 0 has written the metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    weights, moments = get_state_dict(model, optimizer)
    with _cause():
        dcp.save(dict(model=weights, optimizer=moments), checkpoint_id=os.path.join(folder, SHARDED_DIR))


def load(folder, model, optimizer=None):
    """The weights (and with `optimizer` its state) of checkpoint `folder`'s sharded/ into `model`, sharded or
    plain, on any number of ranks (DCP reshards), or in one process with no process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    path = os.path.join(folder, SHARDED_DIR)
    # predict, evaluate or export (no group), or a plain model on one rank: read alone, no collective
    alone = not torch.distributed.is_initialized() or not is_sharded(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # said even when asked for
        with _cause():
            if optimizer is None:
                weights = get_model_state_dict(model)
                dcp.load(dict(model=weights), checkpoint_id=path, no_dist=alone)
                set_model_state_dict(model, weights)
                return
            weights, moments = get_state_dict(model, optimizer)
            state = dict(model=weights, optimizer=moments)
            dcp.load(state, checkpoint_id=path, no_dist=alone)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def _cause():
    """DCP reports a failure on any rank to every rank as a CheckpointException (a BaseException, whose text is
    each rank's traceback): raise the first failing rank's own error instead (a full disk's OSError, ...)."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except CheckpointException as e:
        raise min(e.failures.items())[1][0] from None


def gathered(model, main):
    """Every rank: the whole weights, gathered to rank 0 on the CPU; there (`main`) a plain transformers model of
    the same class holding them, for export; None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # FSDP's subclass removed
    plain = plain_class(model.config)
    plain.load_state_dict(weights)
    return plain.train(model.training)
