"""Shared by the TRL integration tests: a word-level tokenizer, tiny causal LMs (Llama, or Gemma 2 /
Cohere for their logit soft cap / scale), a prompt dataset and the configuration of one SGD step."""
from __future__ import annotations

import datasets
import tokenizers
import torch
import transformers

from fastkd.integrations.trl import DistillationConfig

VOCAB, COMPLETION = 32, 5
_LAYERS = dict(intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               pad_token_id=0, eos_token_id=1, bos_token_id=None)
_CONFIGS = {"llama": transformers.LlamaConfig, "gemma2": transformers.Gemma2Config,
            "cohere": transformers.CohereConfig}


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                padding_side="left")


def model(hidden: int, seed: int, sharpen: float = 1.0, kind: str = "llama", vocab: int = VOCAB,
          bias: bool = False, **config) -> transformers.PreTrainedModel:
    """A one-layer causal LM; ``bias``: an lm_head with a (random) bias; ``config``: extra config fields."""
    torch.manual_seed(seed)
    extra = dict(head_dim=hidden // 2, tie_word_embeddings=False) if kind != "llama" else {}
    cfg = _CONFIGS[kind](vocab_size=vocab, hidden_size=hidden, **_LAYERS, **extra, **config)
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    if bias:
        lm.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
        torch.nn.init.normal_(lm.lm_head.bias, std=1.0)
    with torch.no_grad():  # sharper than the init so that the divergence is not tiny
        lm.lm_head.weight.mul_(sharpen)
    # Several end-of-sequence tokens, so that completions end early and the completion mask has holes.
    lm.generation_config.eos_token_id = list(range(1, VOCAB, 4))
    return lm


def dataset(n: int = 4) -> datasets.Dataset:
    # Prompts of different lengths, so the left padding and the completion mask matter.
    prompts = ["w2 w3 w4", "w5 w6", "w7 w8 w9 w10", "w11", "w12 w13", "w14 w15 w16", "w17", "w18 w19 w20 w21"]
    return datasets.Dataset.from_dict({"prompt": prompts[:n]})


def args(out, config_class=DistillationConfig, **kwargs):
    return config_class(
        output_dir=str(out), max_steps=1, max_completion_length=COMPLETION,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_dropout=True, disable_tqdm=True,
        **{"per_device_train_batch_size": 4, "bf16": False, **kwargs},
    )


def train(trainer_class, training_args, student=None, teacher=None, n_prompts: int = 4) -> dict:
    """One step; the logged loss and entropy, the student's wrapper (DDP, ...), what the trainer kept as
    ``seen``, and the student's weights after the step."""
    student = model(16, 0) if student is None else student
    teacher = model(24, 1, sharpen=8.0) if teacher is None else teacher
    trainer = trainer_class(model=student, teacher_model=teacher, args=training_args, train_dataset=dataset(n_prompts),
                            processing_class=tokenizer())
    out = trainer.train()
    logged = next(log for log in trainer.state.log_history if "entropy" in log)
    return dict(loss=out.training_loss, entropy=logged["entropy"], wrapper=type(trainer.model_wrapped).__name__,
                seen=getattr(trainer, "seen", None),
                weights={k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
