"""The end-to-end demo behind ``fastkd demo``: Hinton et al.'s few-labels distillation experiment on
scikit-learn's bundled digits (no download). scikit-learn, tqdm and matplotlib load only when it runs."""
from fastkd.demo.experiment import DemoConfig


def run_demo(*args, **kwargs):
    """See :func:`fastkd.demo.runner.run_demo`."""
    from fastkd.demo.runner import run_demo as _run

    return _run(*args, **kwargs)


__all__ = ["DemoConfig", "run_demo"]
