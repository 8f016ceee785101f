"""The on-policy metric: a model continues held-out prompts with its own samples, and the teacher scores them.

The teacher's per-token negative log-likelihood (NLL) of what a student writes is what on-policy
distillation lowers; held-out perplexity scores the student on the data's text, not on its own. The
student's NLL of its own samples (an estimate of its entropy rate) comes with it: their difference
estimates the reverse KL(student || teacher) per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SAMPLING = ("sampled at T = 1 (no top-k / top-p), a fixed seed per model; the end-of-text token does not stop a "
            "sample (training windows also run across file ends)")


def eval_prompts(windows: torch.Tensor, count: int, prompt_len: int) -> torch.Tensor:
    """``(count, prompt_len)`` prompts: the starts of ``count`` evenly spaced held-out windows, so they come
    from many files, not from the first few."""
    if prompt_len >= windows.shape[1]:
        raise ValueError(f"prompt_len {prompt_len} must be shorter than the windows ({windows.shape[1]} tokens)")
    rows = torch.linspace(0, len(windows) - 1, min(count, len(windows))).round().long()
    return windows[rows, :prompt_len]


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, seed: int) -> torch.Tensor:
    """``(n, new_tokens)`` tokens sampled from ``model`` after ``prompts`` (equal lengths, so no padding)."""
    model.eval()
    torch.manual_seed(seed)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[:, prompts.shape[1]:]


@torch.no_grad()
def completion_nll(model: torch.nn.Module, prompts: torch.Tensor, completions: torch.Tensor) -> float:
    """``model``'s mean per-token NLL (nats) of ``completions`` after ``prompts``."""
    model.eval()
    ids = torch.cat([prompts, completions], dim=1)
    logits = model(input_ids=ids).logits[:, prompts.shape[1] - 1:-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), completions.reshape(-1)).item()


def sample_nll(model: torch.nn.Module, teacher: torch.nn.Module, prompts: torch.Tensor, new_tokens: int,
               seed: int) -> dict[str, float]:
    """The teacher's and the model's own per-token NLL of the model's samples after ``prompts``."""
    completions = sample(model, prompts, new_tokens, seed)
    teacher_nll = completion_nll(teacher, prompts, completions)
    own_nll = completion_nll(model, prompts, completions)
    return {"teacher_nll": teacher_nll, "own_nll": own_nll, "tokens": completions.numel()}
