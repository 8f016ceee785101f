"""A scikit-build-core metadata provider: fastkd's ``dependencies``, with torch pinned to the build's.

The compiled extension links against one torch's C++ ABI and operator schemas and loads with no
other, so a wheel must not claim ``torch>=...``. The build runs without isolation (see README), so
the torch importable here is the one the extension is compiled against.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def dynamic_metadata(field: str, settings: Mapping[str, Any]) -> list[str]:
    """``torch==<the installed torch's version>`` followed by ``settings["requires"]``."""
    if field != "dependencies":
        raise RuntimeError(f"fastkd_torch_pin provides 'dependencies', not {field!r}")
    from importlib import metadata

    try:
        # The installed distribution's own version, as pip knows it: torch.__version__ may carry a local
        # label (+cu130) that the distribution's metadata does not, and pip would then find no match.
        version = metadata.version("torch")
    except metadata.PackageNotFoundError as e:
        raise RuntimeError(
            "building fastkd needs torch installed first, and pip's --no-build-isolation "
            "(pip install --no-build-isolation ...): the extension is compiled against that torch"
        ) from e
    return [f"torch=={version}", *settings.get("requires", [])]
