"""The ``fastkd`` command: info, bench (forwarded to fastkd.bench.main), demo arguments, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import fastkd
import fastkd.demo
from fastkd import cli


def test_info_prints_the_build_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    info = fastkd.build_info()
    for key in info:
        assert key in out
    assert str(info["cpu_capability"]) in out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(info))


def test_bench_forwards_every_argument(monkeypatch):
    seen = []
    fake = types.ModuleType("fastkd.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fastkd.bench", fake)
    assert cli.main(["bench", "--help", "--sizes", "1x2"]) == 3
    assert seen == [["--help", "--sizes", "1x2"]]


def test_bench_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastkd.bench", None)  # import fails as if the file were absent
    assert cli.main(["bench"]) == 2
    assert "fastkd.bench" in capsys.readouterr().err


def test_demo_arguments_reach_run_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(fastkd.demo, "run_demo", lambda *a, **k: calls.append((a, k)) or {})
    assert cli.main(["demo", "--out", "somewhere", "--quick", "--seeds", "4", "--no-progress"]) == 0
    assert calls == [(("somewhere",), {"quick": True, "seeds": 4, "progress": False, "threads": 1})]
    calls.clear()
    assert cli.main(["demo"]) == 0
    assert calls == [(("demo-output",), {"quick": False, "seeds": None, "progress": True, "threads": 1})]


@pytest.mark.parametrize("argv", [["demo", "--seeds", "0"], ["demo", "--seeds", "many"], ["demo", "--threads", "-1"]])
def test_bad_demo_arguments_name_the_option(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert argv[1] in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out and "info" in out


def test_python_dash_m_fastkd():
    result = subprocess.run([sys.executable, "-m", "fastkd", "info", "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == fastkd.__version__


_IMPORT_CHECK = """
import sys
import torch
import fastkd
print(",".join(m for m in ("torch._dynamo", "torch._inductor", "sympy", "matplotlib", "sklearn") if m in sys.modules))
"""


def test_import_fastkd_loads_no_compiler_or_plotting_modules():
    """`import fastkd` (and so every `fastkd` command) costs little more than `import torch`: torch.compile's
    machinery, matplotlib and scikit-learn load only when used."""
    result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
