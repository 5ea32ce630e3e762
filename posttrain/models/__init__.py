"""Megatron GPT models built from Hugging Face checkpoints, value heads and checkpoint conversion.

* :mod:`posttrain.models.provider`: HF ``config.json`` -> megatron-core ``GPTModel`` (Llama, Qwen2, Mixtral,
  Qwen2-MoE), attention masks, vocabulary padding.
* :mod:`posttrain.models.value_model`: the scalar head of critic and reward models.
* :mod:`posttrain.models.hf_mapping`: weight names and layouts HF <-> megatron-core.
* :mod:`posttrain.models.checkpoint`: the project's checkpoint directory (save / load at any TP / PP / EP).
* :mod:`posttrain.models.convert`: ``convert_ckpt.py``.

Importing this package does not import megatron-core; the names below load their module on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SUPPORTED_MODEL_TYPES": "provider", "MODEL_KINDS": "provider", "UnsupportedModelError": "provider",
    "ArchSpec": "provider", "load_hf_config": "provider", "parse_hf_config": "provider",
    "transformer_config_from_hf": "provider", "build_model": "provider", "unwrap_model": "provider",
    "real_vocab_size": "provider", "ModelInfo": "provider", "model_info": "provider",
    "ParallelLayoutError": "provider", "padded_vocab_size": "provider", "build_attention_mask": "provider",
    "position_ids_from_attention_mask": "provider",
    "GPTValueModel": "value_model", "ValueHead": "value_model", "gather_last_token_scores": "value_model",
    "save_model_checkpoint": "checkpoint", "load_model_checkpoint": "checkpoint",
    "read_checkpoint_meta": "checkpoint", "is_checkpoint": "checkpoint", "model_sharded_state_dict": "checkpoint",
    "CheckpointError": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
