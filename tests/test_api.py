"""Public API: DistillLoss equals the functional form bit for bit, build_info, the fallback."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_inputs

import fastkd
from fastkd import _cuda_fallback


@pytest.mark.parametrize("kwargs", [{}, dict(temperature=4.0, alpha=0.9, reduction="sum"),
                                    dict(temperature=2.0, alpha=0.1, label_smoothing=0.1, ignore_index=3,
                                         scale_by_temperature_squared=False, reduction="none")])
def test_module_equals_functional_bit_for_bit(kwargs):
    s, t, y = make_inputs((3, 5, 70), ignore_index=kwargs.get("ignore_index", -100))
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    a = fastkd.DistillLoss(**kwargs)(s1, t, y)
    b = fastkd.distill_loss(s2, t, y, **kwargs)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(s1.grad, s2.grad)
    assert "temperature" in repr(fastkd.DistillLoss(**kwargs))


def test_return_terms_named_tuple():
    s, t, y = make_inputs((6, 20))
    terms = fastkd.DistillLoss(2.0, 0.5)(s, t, y, return_terms=True)
    assert isinstance(terms, fastkd.DistillTerms)
    assert terms._fields == ("loss", "soft", "hard")
    assert torch.equal(terms.loss, fastkd.distill_loss(s, t, y, temperature=2.0))


def test_build_info():
    info = fastkd.build_info()
    assert info["version"] == fastkd.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert info["cpu_capability"] in info["cpu_capabilities_compiled"]
    if info["cuda"]:
        assert info["cuda_archs"]


def test_cpu_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastkd::distill_forward", "CPU")
    assert fastkd.has_kernel(torch.device("cpu"))


def test_fallback_to_reference_warns_once(monkeypatch):
    s, t, y = make_inputs((4, 30))
    monkeypatch.setattr(_cuda_fallback, "FUSED_DEVICE_TYPES", frozenset(["meta"]))
    monkeypatch.setattr(_cuda_fallback, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no kernel for device type 'cpu'"):
        got = fastkd.distill_loss(s, t, y, temperature=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastkd.distill_loss(s, t, y, temperature=2.0)
    want = fastkd.reference.distill_loss(s, t, y, temperature=2.0)
    assert torch.equal(got, want)


def test_meta_tensors_trace_shapes():
    s = torch.empty(2, 3, 50, device="meta", dtype=torch.bfloat16)
    loss = fastkd.distill_loss(s, s, torch.empty(2, 3, dtype=torch.long, device="meta"), reduction="none")
    assert loss.shape == (2, 3) and loss.dtype == torch.float32 and loss.device.type == "meta"
