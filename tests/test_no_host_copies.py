"""The fused losses copy nothing from the host to the device: the op's weights and the normalisers are
built on the device (a host-to-device copy of a Python number waits for the device and cannot be
captured in a CUDA graph). Checked without a GPU: the losses run on fake CUDA tensors (FakeTensorMode),
and a dispatch mode records every copy whose source is on the CPU and whose result is not."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastkd
from fastkd import _cuda_fallback

COPIES = {"aten._to_copy.default", "aten.copy_.default", "aten._copy_from.default",
          "aten._copy_from_and_resize.default", "aten.copy.default"}


class HostToDeviceCopies(TorchDispatchMode):
    """Records the copies from a CPU tensor into a tensor on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in COPIES:
            sources = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
            results = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
            if func is torch.ops.aten.copy_.default:
                results = sources[:1]  # copy_(self, src) writes into self
                sources = sources[1:]
            if any(s.device.type == "cpu" for s in sources) and any(r.device.type != "cpu" for r in results):
                self.copies.append(str(func))
        return out


VARIANTS = {
    "sum": dict(reduction="sum"),
    "batchmean": dict(reduction="batchmean"),
    "none": dict(reduction="none"),
    "mean": dict(reduction="mean"),
    "mean, soft_mask": dict(reduction="mean", soft=True),
    "mean, no target": dict(reduction="mean", alpha=1.0, no_target=True),
    "num_items_in_batch int": dict(num_items_in_batch=9),
    "num_items_in_batch on the device": dict(num_items_in_batch="device"),
    "num_items_in_batch on the CPU": dict(num_items_in_batch="cpu"),
}


def _arguments(variant: dict, device: str) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    kw = dict(variant)
    no_target = kw.pop("no_target", False)
    soft = kw.pop("soft", False)
    if kw.get("num_items_in_batch") == "device":
        kw["num_items_in_batch"] = torch.full((), 9, device=device)
    elif kw.get("num_items_in_batch") == "cpu":
        kw["num_items_in_batch"] = torch.tensor(9)
    target = None if no_target else torch.zeros(6, dtype=torch.long, device=device)
    soft_mask = torch.ones(6, dtype=torch.bool, device=device) if soft else None
    return dict(temperature=2.0, **kw), target, soft_mask


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA tensors routed to the fused ops (their fake impls), as on a GPU with a kernel image."""
    monkeypatch.setattr(_cuda_fallback, "fused_kernels_run_on", lambda device: True)
    # allow_non_fake_inputs: a real CPU num_items_in_batch is read on the host by the argument check.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])  # the tuned op and the rows op on a GPU
def test_distill_loss_copies_nothing_to_the_device(fake_cuda, variant, divergence):
    kw, target, soft_mask = _arguments(VARIANTS[variant], "cuda")
    s = torch.empty(6, 40, device="cuda", requires_grad=True)
    t = torch.empty(6, 40, device="cuda")
    with HostToDeviceCopies() as recorder:
        loss = fastkd.distill_loss(s, t, target, soft_mask=soft_mask, divergence=divergence, return_terms=True, **kw)
    assert loss.loss.device.type == "cuda"
    assert recorder.copies == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distill_loss_with_a_top_k_teacher_copies_nothing(fake_cuda, variant):
    kw, target, soft_mask = _arguments(VARIANTS[variant], "cuda")
    s = torch.empty(6, 40, device="cuda", requires_grad=True)
    teacher = fastkd.SparseTeacher(torch.zeros(6, 4, dtype=torch.long, device="cuda"), torch.empty(6, 4, device="cuda"))
    with HostToDeviceCopies() as recorder:
        fastkd.distill_loss(s, teacher, target, soft_mask=soft_mask, **kw)
    assert recorder.copies == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_linear_copies_nothing_to_the_device(fake_cuda, variant):
    kw, target, soft_mask = _arguments(VARIANTS[variant], "cuda")
    hs = torch.empty(6, 8, device="cuda", requires_grad=True)
    ws = torch.empty(40, 8, device="cuda", requires_grad=True)
    ht, wt = torch.empty(6, 8, device="cuda"), torch.empty(40, 8, device="cuda")
    with HostToDeviceCopies() as recorder:
        fastkd.fused_linear_distill_loss(hs, ws, target, teacher_hidden=ht, teacher_weight=wt, soft_mask=soft_mask,
                                         chunk_size=4, return_terms=True, **kw)
    assert recorder.copies == []


def test_the_recorder_sees_a_host_to_device_copy(fake_cuda):
    with HostToDeviceCopies() as recorder:
        torch.as_tensor(0.5, dtype=torch.float64, device="cuda")
        torch.empty((), device="cuda").copy_(torch.tensor(1.0))
    assert recorder.copies == ["aten._to_copy.default", "aten.copy_.default"]
