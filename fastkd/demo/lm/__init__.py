"""``fastkd demo lm``: a Llama-style teacher trained on the Python standard library's own source, distilled
into a smaller student with cross-entropy only, dense forward KL, JSD, an offline top-k teacher and the
fused linear loss, and on-policy on its own samples (TRL, optional). transformers, tokenizers, matplotlib
and TRL load only when it runs."""
from fastkd.demo.lm.config import LMDemoConfig


def run_lm_demo(*args, **kwargs):
    """See :func:`fastkd.demo.lm.runner.run_lm_demo`."""
    from fastkd.demo.lm.runner import run_lm_demo as _run

    return _run(*args, **kwargs)


__all__ = ["LMDemoConfig", "run_lm_demo"]
