"""Wrapping a model for data parallelism (DDP or FSDP2) and moving its state in and out.

State always leaves and enters in one portable form: full (unsharded) tensors keyed by parameter
name, for the weights and the optimizer alike, so a checkpoint written by any number of
processes, with or without FSDP, resumes on any other.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from cliptrain.base.distributed import World
from cliptrain.checkpoint.store import unwrap
from cliptrain.training.compile import compile_model
from cliptrain.base.precision import DTYPES


def wrap_model(model: nn.Module, world: World, strategy: str, precision: str, compile: bool = False) -> nn.Module:
    """`model` ready for training on `world`: DDP or FSDP2 across processes, optionally torch.compile'd
    (uncompiled, with a warning, when torch.compile refuses it)."""
    if world.distributed and strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision] if precision != "fp32" else None,
                                      reduce_dtype=torch.float32)
        for tower in _towers(model):
            for block in (tower.block_modules() if hasattr(tower, "block_modules") else tower.blocks):
                fully_shard(block, mp_policy=policy)
            fully_shard(tower, mp_policy=policy)
        # The logit scale (and bias) stay plain parameters, their gradients averaged by the trainer
        # (average_unsharded_grads): a loss taken on each rank's own rows gives each rank another one.
    elif world.distributed:
        from torch.nn.parallel import DistributedDataParallel
        ids = [world.device.index] if world.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return compile_model(model) if compile else model


def average_unsharded_grads(model: nn.Module) -> None:
    """Under FSDP2, average over ranks the gradients of the parameters it does not manage (the logit scale
    and bias: no DDP reduces them). They agree already when every rank computes the global loss; with a
    loss that each rank takes on its own rows (SigLIP's ring) they differ, and unaveraged the ranks' copies
    would drift apart. Nothing happens without FSDP."""
    if not is_fsdp(model):
        return
    from torch.distributed.tensor import DTensor
    from cliptrain.base.distributed import mean_over_ranks
    for p in unwrap(model).parameters():
        if p.grad is not None and not isinstance(p, DTensor):
            p.grad.copy_(mean_over_ranks(p.grad))


def _towers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The sharded units: image and text towers, and a CoCa's decoder."""
    return tuple(m for m in (model.visual, model.text, getattr(model, "decoder", None)) if m is not None)


def is_fsdp(model: nn.Module) -> bool:
    """Whether FSDP2 manages part of `model`."""
    inner = unwrap(model)
    return hasattr(inner, "visual") and type(inner.visual).__name__.startswith("FSDP")


def no_sync(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager] | None:
    """A context factory that suppresses gradient synchronisation for accumulation micro-steps."""
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    if hasattr(inner, "no_sync") and isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.no_sync
    if is_fsdp(model):
        towers = _towers(unwrap(model))

        @contextlib.contextmanager
        def fsdp_no_sync():
            for t in towers:
                t.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                for t in towers:
                    t.set_requires_gradient_sync(True)
        return fsdp_no_sync
    return None


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU weights keyed by name (a collective under FSDP: call it on every rank)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full tensors, keyed by parameter name (a collective under FSDP)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    sd = optimizer.state_dict()
    ids = {}
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        ids.update({i: names[id(p)] for i, p in zip(saved["params"], group["params"])})
    return {"state": {ids[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [ids[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what `optimizer_state_dict` returned (from any number of processes) into `optimizer`."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    current = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    saved = [sorted(g["params"]) for g in state["param_groups"]]
    if current != saved:
        raise ValueError(f"the checkpoint's optimizer groups hold other parameters than this run's "
                         f"({[len(g) for g in saved]} against {[len(g) for g in current]} tensors): resume with the "
                         f"optim section and lock settings the checkpoint was saved with (its config.yaml)")
    template = optimizer.state_dict()
    index = {}
    for group, saved in zip(optimizer.param_groups, template["param_groups"]):
        index.update({names[id(p)]: i for i, p in zip(saved["params"], group["params"])})
    optimizer.load_state_dict({
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]})


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Every rank writes its FSDP shards of the weights and optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    weights, optim = get_state_dict(unwrap(model), optimizer)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(path))


def _adamw_template(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A name-keyed AdamW state with the right shapes, for torch.distributed.checkpoint to fill in."""
    state = {n: {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for n, p in unwrap(model).named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path) -> None:
    """Load a sharded checkpoint, resharding it to this run's processes (FSDP) or into one process."""
    import torch.distributed.checkpoint as dcp
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        weights, optim = get_state_dict(unwrap(model), optimizer)
        dcp.load({"model": weights, "optim": optim}, checkpoint_id=str(path))
        set_state_dict(unwrap(model), optimizer, model_state_dict=weights, optim_state_dict=optim)
        return
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError("loading a sharded checkpoint without FSDP supports AdamW only")
    weights = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    optim = _adamw_template(model, optimizer)
    dcp.load({"model": weights, "optim": optim}, checkpoint_id=str(path))
    unwrap(model).load_state_dict(weights)
    load_optimizer_state_dict(model, optimizer, optim)
