"""Intermediate-feature ("hint", layer-wise) distillation: capture named submodules' outputs with
forward hooks and add an MSE between student and teacher features (FitNets, Romero et al. 2015)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FeaturePair:
    """One hint: the output of ``student`` (a module name in the student) is mapped by ``projector``
    (optional; identity when None) and pulled towards the output of ``teacher`` (a module name in the
    teacher) with ``weight * MSE``. The projector is trained with the student."""

    student: str
    teacher: str
    projector: nn.Module | None = None
    weight: float = 1.0


def normalize_pairs(pairs: Iterable[Any] | None) -> list[FeaturePair]:
    """Accept FeaturePair objects or tuples ``(student, teacher[, projector[, weight]])``."""
    if pairs is None:
        return []
    if isinstance(pairs, (FeaturePair, str)) or (isinstance(pairs, tuple) and pairs and isinstance(pairs[0], str)):
        raise TypeError("feature_pairs must be a list of pairs, e.g. [('layer1', 'block3', projector)]")
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, FeaturePair):
            pair = p
        elif isinstance(p, Sequence) and 2 <= len(p) <= 4:
            pair = FeaturePair(*p)
        else:
            raise TypeError(
                f"feature_pairs[{i}] must be a FeaturePair or a tuple (student_module, teacher_module"
                f"[, projector[, weight]]), got {p!r}"
            )
        if not isinstance(pair.student, str) or not isinstance(pair.teacher, str):
            raise TypeError(f"feature_pairs[{i}]: module names must be strings, got {pair.student!r}, {pair.teacher!r}")
        if pair.projector is not None and not isinstance(pair.projector, nn.Module):
            raise TypeError(f"feature_pairs[{i}]: projector must be an nn.Module or None")
        if not pair.weight >= 0:
            raise ValueError(f"feature_pairs[{i}]: weight must be >= 0, got {pair.weight}")
        out.append(pair)
    return out


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. transformer blocks returning (hidden, attn)
    raise TypeError(f"a hooked module returned {type(output).__name__}, not a tensor")


def _submodule(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        known = [n for n, _ in model.named_modules() if n][:20]
        raise ValueError(f"feature_pairs: the {which} has no submodule {name!r}; some of its modules: {known}") from e


def check_modules(model: nn.Module, names: list[str], which: str) -> None:
    """Fail now, naming the module, when ``model`` lacks one of ``names``."""
    for name in names:
        _submodule(model, name, which)


class FeatureHooks:
    """Forward hooks that keep the latest output of each named module, until :meth:`remove`."""

    def __init__(self, model: nn.Module, names: list[str], which: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for name in dict.fromkeys(names):
                self._handles.append(_submodule(model, name, which).register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = _first_tensor(output)

        return hook

    def pop(self, name: str) -> torch.Tensor:
        try:
            return self.outputs.pop(name)
        except KeyError:
            raise RuntimeError(f"feature_pairs: module {name!r} did not run in the forward pass") from None

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def feature_loss(
    pairs: list[FeaturePair], student_hooks: FeatureHooks, teacher_hooks: FeatureHooks
) -> torch.Tensor | None:
    """Sum of ``weight * MSE(projector(student feature), teacher feature)`` over the pairs."""
    total = None
    for pair in pairs:
        s = student_hooks.pop(pair.student)
        t = teacher_hooks.pop(pair.teacher)
        if pair.projector is not None:
            s = pair.projector(s)
        if s.shape != t.shape:
            raise ValueError(
                f"feature_pairs: student feature {pair.student!r} has shape {tuple(s.shape)}"
                f"{' after its projector' if pair.projector is not None else ''} but teacher feature "
                f"{pair.teacher!r} has shape {tuple(t.shape)}; give the pair a projector that maps one to the other"
            )
        term = pair.weight * F.mse_loss(s.float(), t.float())
        total = term if total is None else total + term
    return total
