"""Every ISA build of the CPU kernel gives the same results: the portable (DEFAULT) build, forced
with ATEN_CPU_CAPABILITY=default in a subprocess, against the one this process runs."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import fastkd

CASES = (("float32", 2.0), ("bfloat16", 3.0), ("float32", 100.0))

SCRIPT = r"""
import sys, torch, fastkd
results = []
for dtype, temperature in CASES:
    torch.manual_seed(0)
    s = (torch.randn(37, 2500) * 4).to(getattr(torch, dtype)).requires_grad_()
    t = (torch.randn(37, 2500) * 4).to(s.dtype).requires_grad_()
    y = torch.randint(0, 2500, (37,)); y[::7] = -100
    terms = fastkd.distill_loss(s, t, y, temperature=temperature, alpha=0.6, label_smoothing=0.1,
                                return_terms=True)
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


def test_default_isa_matches_the_vector_build(tmp_path):
    portable_run, native_run = _run(tmp_path, "default"), _run(tmp_path, None)
    assert portable_run["cap"] == "default"
    assert native_run["cap"] == fastkd.build_info()["cpu_capability"]
    for (dtype, _), portable, native in zip(CASES, portable_run["results"], native_run["results"], strict=True):
        for a, b in zip(portable["terms"], native["terms"], strict=True):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
        for key in ("gs", "gt"):
            scale = native[key].float().abs().max().item()
            tol = 1e-5 if dtype == "float32" else 1e-2
            torch.testing.assert_close(portable[key].float(), native[key].float(), rtol=0, atol=tol * scale)
