"""Sharded models (FSDP2, DeepSpeed ZeRO-3): run code inside a wrapped module's forward, where its
parameters exist whole and its gradient reduction is armed, and refuse weights read outside it."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

R = TypeVar("R")

# Wrappers that keep the wrapped model as ``.module`` and call it from their own forward.
_WRAPPER_NAMES = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def innermost_module(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / DeepSpeed engine wrappers (``module``
    itself when unwrapped: FSDP2's ``fully_shard`` keeps the module and adds hooks to it)."""
    while type(module).__name__ in _WRAPPER_NAMES and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Run ``module``'s calls through ``forward`` inside the block (an instance attribute, restored on
    exit), so that the module's hooks and any wrapper around it still run around it."""
    missing = object()
    saved = module.__dict__.get("forward", missing)
    module.forward = forward
    try:
        yield
    finally:
        if saved is missing:
            del module.forward
        else:
            module.forward = saved


def inside_forward(module: nn.Module, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``fn(*args, **kwargs)``, run as the forward of ``module`` (whatever wraps it), and its result.

    ``module`` is a plain module, DistributedDataParallel, an FSDP2 ``fully_shard``-ed module or a
    DeepSpeed engine. The innermost model's forward is replaced by ``fn`` for the call and the
    outermost wrapper is called with ``args`` / ``kwargs``, so every wrapper does what it does around a
    forward: FSDP2 gathers the parameters of the module's own group before ``fn`` runs (so
    ``module.lm_head.weight`` read inside ``fn`` is the whole ``(V, H)`` tensor, not a DTensor shard) and
    reduce-scatters their gradients in backward; DistributedDataParallel all-reduces the gradients of
    the parameters ``fn`` used. ``fn`` receives the arguments as the wrapper passes them on (moved or
    cast by it, if it does so) and may return any tensors or containers of tensors.

    Example (a plain loop, the student wrapped by FSDP2 / DDP)::

        def loss_fn(input_ids, labels):
            hidden = student.model(input_ids).last_hidden_state
            return fastkd.fused_linear_distill_loss(hidden, student.lm_head.weight, labels, ...)

        loss = fastkd.inside_forward(student, loss_fn, input_ids, labels)
        loss.backward()

    Parameters of submodules sharded as groups of their own (FSDP2 ``fully_shard`` on a submodule,
    every ZeRO-3 submodule) are gathered only inside that submodule's forward: nest the calls
    (``inside_forward(model, lambda: inside_forward(model.lm_head, fn))``).

    Args:
        module: the (wrapped) model whose forward ``fn`` runs as.
        fn: called with ``*args, **kwargs``.

    Returns:
        What ``fn`` returns (after the wrappers' post-forward hooks).

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module`` or ``fn`` is not callable.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module (or a wrapper of one), got {type(module).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    with forward_replaced(innermost_module(module), fn):
        return module(*args, **kwargs)


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a DTensor (an FSDP2 shard, tensor-parallel logits or weights). No DTensor can exist
    unless torch.distributed.tensor was imported, so nothing is imported here."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(x, dtensor)


def unmaterialised(x: torch.Tensor) -> str | None:
    """What kind of shard ``x`` is when it is not the whole parameter (an FSDP2 DTensor, a ZeRO-3
    partition), else None."""
    if is_dtensor(x):
        return "a DTensor (an FSDP2 shard, outside its module's forward)"
    # DeepSpeed ZeRO-3 marks its parameters with ds_id / ds_status, and an ungathered one is empty with its
    # whole shape in ds_shape.
    status = getattr(getattr(x, "ds_status", None), "name", "AVAILABLE")
    empty = x.numel() == 0 and getattr(x, "ds_shape", None) is not None and torch.Size(x.ds_shape).numel() > 0
    if (hasattr(x, "ds_id") and status != "AVAILABLE") or empty:
        return "a DeepSpeed ZeRO-3 partition (not gathered)"
    return None


def check_materialised(**tensors: torch.Tensor | None) -> None:
    """Raise for any weight that is a shard rather than the whole parameter.

    Raises:
        ValueError: naming the argument and ``fastkd.inside_forward``.
    """
    for name, x in tensors.items():
        kind = None if x is None else unmaterialised(x)
        if kind is not None:
            raise ValueError(
                f"{name} is {kind}: its full value and its gradient reduction exist only inside the model's "
                f"forward. Call the loss through fastkd.inside_forward(model, fn, ...) and read the weight inside fn"
            )


def is_fsdp2(module: nn.Module) -> bool:
    """Whether ``module`` (or a module inside it) was sharded by FSDP2's ``fully_shard``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in module.modules())


def shard_frozen(model: nn.Module, device_type: str) -> nn.Module:
    """``model`` sharded with FSDP2 across all processes for forward only: eval mode, no gradients, each
    block of its ``_no_split_modules`` classes (the decoder layers of a transformers model) a group of
    its own, gathered one at a time as the forward reaches it, then the rest as the root group, resharded
    after the forward too (FSDP2 keeps a root group whole after the forward unless told otherwise, for a
    backward that a frozen model never runs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.eval().requires_grad_(False)
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def is_zero3(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are managed by DeepSpeed ZeRO-3 (they carry ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def zero3_frozen(model: nn.Module, ds_config: dict) -> Any:
    """``model`` partitioned by DeepSpeed ZeRO-3 across all processes for forward only (eval mode, no
    gradients, no optimizer): a DeepSpeed engine of ``ds_config`` without its optimizer and scheduler.
    The model's parameters are gathered module by module by the hooks ZeRO-3 puts on ``model`` itself,
    so ``model`` is called as before. Returns the engine (keep a reference)."""
    import copy

    import deepspeed

    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden:  # the sizes transformers' Trainer derives from the hidden size, where left to it
        sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                 "stage3_param_persistence_threshold": 10 * hidden}
        zero.update({k: v for k, v in sizes.items() if zero.get(k) == "auto"})
    model.eval().requires_grad_(False)
    engine = deepspeed.initialize(model=model, config=_without_auto(config))[0]
    engine.eval()
    return engine


def _without_auto(config: Any) -> Any:
    """``config`` without the entries still "auto" (DeepSpeed's defaults apply to them)."""
    if isinstance(config, dict):
        return {k: _without_auto(v) for k, v in config.items() if v != "auto"}
    return config
