"""Every ISA build of the CPU kernel gives the same results: the portable (DEFAULT) build, forced
with ATEN_CPU_CAPABILITY=default in a subprocess, and the AVX2 build on an AVX-512 machine, against the
one this process runs. The mixtures (jsd, skew KL) have their own vector exp / log1p per ISA; their
cases span log-ratios from near 0 to past the +-80 clamp."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastkd

# dtype, temperature, divergence, beta, logit scale
CASES = (
    ("float32", 2.0, "forward_kl", None, 4.0),
    ("bfloat16", 3.0, "forward_kl", None, 4.0),
    ("float32", 100.0, "forward_kl", None, 4.0),
    ("float32", 2.0, "jsd", 0.5, 4.0),
    ("float32", 0.5, "jsd", 1e-6, 40.0),
    ("bfloat16", 1.0, "jsd", 0.9, 4.0),
    ("float32", 1.0, "skew_forward_kl", 0.1, 4.0),
    ("float32", 0.5, "skew_reverse_kl", 0.3, 40.0),
)

SCRIPT = r"""
import sys, torch, fastkd
results = []
for dtype, temperature, divergence, beta, scale in CASES:
    torch.manual_seed(0)
    s = (torch.randn(37, 2500) * scale).to(getattr(torch, dtype)).requires_grad_()
    t = (torch.randn(37, 2500) * scale).to(s.dtype).requires_grad_()
    y = torch.randint(0, 2500, (37,)); y[::7] = -100
    terms = fastkd.distill_loss(s, t, y, temperature=temperature, alpha=0.6, label_smoothing=0.1,
                                divergence=divergence, beta=beta, return_terms=True)
    terms.loss.backward()
    results.append({"terms": tuple(terms), "gs": s.grad, "gt": t.grad})
torch.save({"cap": fastkd.build_info()["cpu_capability"], "results": results}, sys.argv[1])
""".replace("CASES", repr(CASES))


def _run(tmp_path, capability: str | None):
    out = tmp_path / f"{capability}.pt"
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, check=True, timeout=120)
    return torch.load(out)


def _assert_same(other_run, native_run):
    for (dtype, *_), other, native in zip(CASES, other_run["results"], native_run["results"], strict=True):
        for a, b in zip(other["terms"], native["terms"], strict=True):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
        largest = {key: native[key].float().abs().max().item() for key in ("gs", "gt")}
        tol = 1e-5 if dtype == "float32" else 1e-2
        for key in ("gs", "gt"):
            # At least 1e-3 of the larger gradient: with beta = 1e-6 the teacher's is ~1e-23, and fp32
            # rounding of its cancelling terms leaves ~1e-15 in every build.
            scale = max(largest[key], 1e-3 * max(largest.values()))
            torch.testing.assert_close(other[key].float(), native[key].float(), rtol=0, atol=tol * scale)


def test_default_isa_matches_the_vector_build(tmp_path):
    portable_run, native_run = _run(tmp_path, "default"), _run(tmp_path, None)
    assert portable_run["cap"] == "default"
    assert native_run["cap"] == fastkd.build_info()["cpu_capability"]
    _assert_same(portable_run, native_run)


@pytest.mark.skipif(fastkd.build_info()["cpu_capability"] != "avx512", reason="needs the AVX-512 build running")
def test_avx2_build_matches_the_avx512_build(tmp_path):
    avx2_run, native_run = _run(tmp_path, "avx2"), _run(tmp_path, None)
    assert avx2_run["cap"] == "avx2"
    _assert_same(avx2_run, native_run)
