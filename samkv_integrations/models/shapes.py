"""Random-weight models of named shapes, with an offline byte-level tokenizer.

Random weights are right for measuring time and memory (the work depends only on the
shapes) and for unit tests (every invariant must hold for any weights); they are never
used to measure accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from samkv_integrations.models.loaded import LoadedModel

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

#: Named shapes: (config class, config fields). Real shapes copy the public configs.
SHAPES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-llama": (
        LlamaConfig,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            vocab_size=264,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "tiny-llama3-rope": (
        LlamaConfig,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16384,
            vocab_size=264,
            rope_parameters=_LLAMA3_ROPE,
        ),
    ),
    "tiny-qwen2": (
        Qwen2Config,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            vocab_size=264,
        ),
    ),
    "smollm2-135m": (
        LlamaConfig,
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        ),
    ),
    "llama-3.1-8b": (
        LlamaConfig,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            vocab_size=128256,
            rms_norm_eps=1e-5,
            rope_parameters=_LLAMA3_ROPE,
        ),
    ),
    "qwen2.5-7b": (
        Qwen2Config,
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            vocab_size=152064,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) with ChatML specials and template."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for special in _SPECIALS:
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


def shape_config(shape: str, **overrides: Any) -> PretrainedConfig:
    """The config of a named shape, with optional field overrides."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    config_class, fields = SHAPES[shape]
    config = config_class(**{**fields, **overrides})
    config._attn_implementation = "sdpa"
    return config


def random_model(
    shape: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **overrides: Any,
) -> LoadedModel:
    """A random-weight model of a named shape, built on the target device.

    Args:
        shape: A key of ``SHAPES``.
        device: Defaults to CUDA when available.
        dtype: Defaults to bfloat16 on CUDA, float32 on CPU.
        seed: Seed for the weights (same seed, same fingerprint).
        overrides: Config fields to change (e.g. ``num_hidden_layers``).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = shape_config(shape, **overrides)
    tokenizer = byte_tokenizer()
    # The shape's family ids (Llama's EOS is 2) are plain bytes in this tokenizer ('#'):
    # the model must end, start and pad with the tokenizer's own special tokens.
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return LoadedModel.from_module(model, tokenizer, f"random:{shape}")
