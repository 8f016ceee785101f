"""The lm_head as ``x @ weight.T + bias`` for the fused-linear path: a plain ``nn.Linear``, PEFT's
``modules_to_save`` copy of it, or a PEFT LoRA layer on it (its adapters folded into the weight).
Any other head, or one whose forward a hook may change, is refused: the fused path computes no
logits through the head's forward, so a head it cannot reproduce exactly would be silently wrong."""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from fastkd.sharding import check_materialised

FUSED_OFF = "use fused_linear=False"
# Hooks that frameworks put on every module to gather / move parameters: they leave the output alone.
_PARAMETER_HOOK_MODULES = ("torch.distributed.", "deepspeed.", "accelerate.")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (``model`` itself when not wrapped).

    Its adapters on inner layers (LoRA on the attention, ...) stay in place, so running its base model
    runs them. Prompt learning (prefix / prompt tuning) adds virtual tokens in ``PeftModel.forward``
    itself, which the fused path bypasses.

    Raises:
        ValueError: a prompt-learning adapter is active.
    """
    get_base = getattr(model, "get_base_model", None)
    if get_base is None or not _is_peft(model, "peft.peft_model", "PeftModel"):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"fused_linear=True runs the student's base model directly, which skips the virtual tokens of "
            f"its {type(config).__name__} adapter; {FUSED_OFF}"
        )
    return get_base()


def check_head(head: nn.Module, what: str = "lm_head") -> None:
    """Refuse a head whose output :func:`head_weight_and_bias` does not give exactly (run before any
    forward: it reads only the modules' structure, not their weights).

    Accepted: ``nn.Linear`` (or the same class sharded by FSDP2); PEFT's ``ModulesToSaveWrapper`` whose
    running copy is accepted; PEFT's LoRA ``Linear`` on an accepted base layer whose active adapters are
    plain LoRA (no DoRA or other variant) with their dropout off (p = 0, or eval mode). No module may
    carry forward (pre-)hooks other than the parameter-gathering ones of FSDP2, DeepSpeed and accelerate.

    Raises:
        ValueError: naming the module and ``fused_linear=False``.
    """
    _check_hooks(head, what)
    cls = own_class(head)
    if cls is nn.Linear:
        return
    if _is_peft(head, "peft.utils.other", "ModulesToSaveWrapper"):
        copy, copy_name = _running_copy(head)
        check_head(copy, f"{what}.{copy_name}")
    elif _is_peft(head, "peft.tuners.lora.layer", "Linear"):
        _check_lora(head, what)
    else:
        raise ValueError(
            f"fused_linear=True computes the logits as hidden @ {what}.weight.T (+ bias), but the {what} is a "
            f"{cls.__name__}, whose forward may compute something else; {FUSED_OFF}"
        )


def head_weight_and_bias(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` such that ``x @ weight.T + bias`` is what ``head(x)``
    computes, for a head that :func:`check_head` accepted.

    - ``nn.Linear``: its weight and bias.
    - PEFT ``ModulesToSaveWrapper``: the running copy's (the active adapter's; the original with
      adapters disabled).
    - PEFT LoRA ``Linear``: ``W + sum over the active adapters of scaling * B @ A`` (and ``scaling *
      b_B`` for a LoRA bias), a differentiable (V, H) tensor, so that A and B get their gradients
      through autograd; merged adapters are already in ``W``.
    """
    if own_class(head) is nn.Linear:
        return head.weight, head.bias
    if _is_peft(head, "peft.utils.other", "ModulesToSaveWrapper"):
        return head_weight_and_bias(_running_copy(head)[0])
    weight, bias = head_weight_and_bias(head.get_base_layer())
    if head.disable_adapters or head.merged:
        return weight, bias
    for adapter in _lora_adapters(head):
        lora_a, lora_b, scaling = head.lora_A[adapter], head.lora_B[adapter], head.scaling[adapter]
        # A shard (FSDP2, ZeRO-3 outside the submodule's forward) would fail the sum unclearly.
        check_materialised(**{"lm_head.base_layer.weight": weight, f"lm_head.lora_A[{adapter!r}].weight": lora_a.weight,
                              f"lm_head.lora_B[{adapter!r}].weight": lora_b.weight})
        weight = weight + ((lora_b.weight @ lora_a.weight) * scaling).to(weight.dtype)
        if lora_b.bias is not None:
            delta_bias = (lora_b.bias * scaling).to(weight.dtype)
            bias = delta_bias if bias is None else bias + delta_bias
    return weight, bias


def own_class(module: nn.Module) -> type:
    """``module``'s class, seen through FSDP2's ``fully_shard`` (which swaps in a subclass ``FSDP<cls>``)."""
    cls = type(module)
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        bases = [b for b in cls.__bases__ if b is not fsdp_module]
        if len(bases) == 1:
            return bases[0]
    return cls


def _running_copy(wrapper: nn.Module) -> tuple[nn.Module, str]:
    """The module a ``ModulesToSaveWrapper``'s forward runs, and its name: the first active adapter's
    copy, or the original module when adapters are disabled or an active one has no copy."""
    active = list(wrapper.active_adapters)
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return wrapper.original_module, "original_module"
    return wrapper.modules_to_save[active[0]], f"modules_to_save[{active[0]!r}]"


def _lora_adapters(head: nn.Module) -> list[str]:
    """The adapters a LoRA layer's (unmerged, enabled) forward adds, in its order."""
    return [a for a in head.active_adapters if a in head.lora_A]


def _check_lora(head: nn.Module, what: str) -> None:
    check_head(head.get_base_layer(), f"{what}.base_layer")
    if head.disable_adapters and head.merged:
        # Its forward would unmerge the weights first: the weight read before it is not the one used.
        raise ValueError(f"the {what}'s LoRA adapters are merged and disabled; unmerge them or {FUSED_OFF}")
    if head.disable_adapters or head.merged:
        return
    if getattr(head, "fan_in_fan_out", False):
        raise ValueError(f"the {what}'s LoRA layer is fan_in_fan_out (a Conv1D head); {FUSED_OFF}")
    for adapter in _lora_adapters(head):
        _check_lora_adapter(head, adapter, f"{what}'s LoRA adapter {adapter!r}")


def _check_lora_adapter(head: nn.Module, adapter: str, name: str) -> None:
    """``B(A(dropout(x))) * scaling`` is ``x @ (scaling * B @ A).T (+ scaling * b_B)`` when the dropout
    is off and A, B are plain linear maps."""
    if adapter in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(adapter, False):
        raise ValueError(f"the {name} is a LoRA variant (DoRA, ...) the fused path does not compute; {FUSED_OFF}")
    dropout = head.lora_dropout[adapter]
    if not isinstance(dropout, nn.Dropout | nn.Identity):
        raise ValueError(f"the {name}'s dropout is a {type(dropout).__name__}; {FUSED_OFF}")
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        raise ValueError(
            f"the {name} has lora_dropout={dropout.p} in training, which the fused path cannot apply to the "
            f"weight; set lora_dropout=0 or {FUSED_OFF}"
        )
    for part in ("lora_A", "lora_B"):
        module = getattr(head, part)[adapter]
        _check_hooks(module, f"{name}'s {part}")
        if own_class(module) is not nn.Linear:
            raise ValueError(f"the {name}'s {part} is a {type(module).__name__}, not an nn.Linear; {FUSED_OFF}")
    if head.lora_A[adapter].bias is not None:
        raise ValueError(f"the {name}'s lora_A has a bias; {FUSED_OFF}")


def _check_hooks(module: nn.Module, what: str) -> None:
    """A hook may change the module's output, which the fused path never computes; the frameworks'
    parameter-gathering hooks do not."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for hook in hooks.values():
            if not _hook_origin(hook).startswith(_PARAMETER_HOOK_MODULES):
                raise ValueError(
                    f"fused_linear=True computes the logits from the {what}'s weight without running its "
                    f"forward, but the {what} has a forward hook ({_hook_name(hook)}) that may change its "
                    f"output; remove the hook or {FUSED_OFF}"
                )


def _is_peft(obj: object, module_name: str, class_name: str) -> bool:
    """Whether ``obj`` is an instance of PEFT's ``module_name.class_name`` (False when PEFT was never
    imported: no PEFT object can exist then)."""
    cls = getattr(sys.modules.get(module_name), class_name, None)
    return cls is not None and isinstance(obj, cls)


def _hook_origin(hook: Callable) -> str:
    """The module that defined ``hook`` (through ``functools.partial``), e.g. ``torch.distributed.fsdp...``."""
    func = getattr(hook, "func", hook)
    return str(getattr(func, "__module__", None) or "")


def _hook_name(hook: Callable) -> str:
    func = getattr(hook, "func", hook)
    return f"{_hook_origin(hook)}.{getattr(func, '__qualname__', type(func).__name__)}".lstrip(".")
