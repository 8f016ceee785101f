"""The benchmark scripts (benchmarks/*.py) as modules, for the tests that run them at tiny sizes."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str) -> ModuleType:
    """benchmarks/<name>.py, loaded from its file and registered as ``name`` (dataclasses resolve the
    script's string annotations through sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_by_name(name: str) -> ModuleType:
    """benchmarks/<name>.py imported by its name, as processes it spawns import it to unpickle its workers
    (they need BENCHMARKS on their sys.path too)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
