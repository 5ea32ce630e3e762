"""Read and check Hugging Face ``config.json`` files: the supported families, the architecture spec
(:class:`ArchSpec`) the builders in :mod:`posttrain.models.provider` work from, size checks, and the padded
vocabulary size. The mapping of HF fields onto megatron-core's ``TransformerConfig`` is described in
:mod:`posttrain.models.provider`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from posttrain.errors import InputError, InputFileNotFoundError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mixtral", "qwen2_moe")
"""HF ``model_type`` values this module can build."""

MODEL_KINDS = ("causal_lm", "value")
"""``causal_lm``: actor / reference (LM head). ``value``: critic / reward (scalar head)."""

_MOE_TYPES = ("mixtral", "qwen2_moe")


class ParallelLayoutError(InputError, ValueError):
    """TP / PP / EP cannot split the model (message names the flag and the HF field that do not divide)."""


class ModelConfigError(InputError, ValueError):
    """A Hugging Face ``config.json`` that cannot be read or is invalid (message names the file)."""


class UnsupportedModelError(InputError, ValueError):
    """The HF configuration describes something these models cannot reproduce (message names the field)."""


# ----------------------------------------------------------------------------------------------------------------
# HF configuration
# ----------------------------------------------------------------------------------------------------------------


def load_hf_config(path: str | Path) -> dict:
    """Read a Hugging Face ``config.json``.

    Args:
        path: a model directory holding ``config.json``, or the path of the JSON file itself.

    Returns:
        The raw configuration dict, exactly as stored (it is what checkpoints carry and give back).

    Raises:
        FileNotFoundError: the directory or its ``config.json`` does not exist.
        ValueError: the file is not valid JSON or has no ``model_type``.
    """
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        where = f"{path}: no config.json in this directory" if path.is_dir() else f"{config_path}: file not found"
        raise InputFileNotFoundError(where)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{config_path}: not a valid JSON file ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelConfigError(f"{config_path}: no 'model_type' field, not a Hugging Face model config")
    return config


def _normalized(hf_config: dict) -> dict:
    """The config with transformers' class defaults filled in and legacy RoPE fields converted."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    from transformers import CONFIG_MAPPING

    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    try:
        return CONFIG_MAPPING[model_type](**fields).to_dict()
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"invalid {model_type} config: {exc}") from None


@dataclass(frozen=True)
class ArchSpec:
    """The architecture facts read from an HF config (see the module docstring for the field mapping).

    Attributes:
        model_type: one of :data:`SUPPORTED_MODEL_TYPES`.
        num_layers, hidden_size, num_attention_heads, num_query_groups, kv_channels, ffn_hidden_size: sizes.
        vocab_size: the real (unpadded) vocabulary size.
        max_position_embeddings: the longest sequence the model was trained for.
        norm_eps: RMSNorm epsilon. tie_word_embeddings: output layer shares the input embedding.
        qkv_bias: the Q/K/V projections have a bias. attention_dropout: dropout on attention probabilities.
        init_std: standard deviation of weight initialisation.
        rope_theta: RoPE base. rope_type: ``default``, ``llama3`` or ``linear``. rope_factor,
        rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position_embeddings: scaling parameters.
        num_experts: experts per MoE layer (None: dense). moe_topk: experts per token. moe_ffn_hidden_size:
        expert MLP width. moe_shared_ffn_hidden_size: shared-expert width (None: no shared expert).
        moe_shared_expert_gate: the shared expert output is scaled by ``sigmoid(x @ w)``.
        moe_pre_softmax: softmax over all experts before top-k without renormalising (``norm_topk_prob=False``).
        moe_layer_pattern: per layer 1 = MoE, 0 = dense MLP (``ffn_hidden_size``).
        router_aux_loss_coef: HF's load-balancing loss coefficient.
        dtype: the checkpoint's declared dtype name (``float32``, ``bfloat16``, ...), or None.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    attention_dropout: float
    init_std: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_position_embeddings: int
    num_experts: Optional[int]
    moe_topk: int
    moe_ffn_hidden_size: Optional[int]
    moe_shared_ffn_hidden_size: Optional[int]
    moe_shared_expert_gate: bool
    moe_pre_softmax: bool
    moe_layer_pattern: Optional[tuple]
    router_aux_loss_coef: float
    dtype: Optional[str]

    @property
    def is_moe(self) -> bool:
        """True for mixture-of-experts models."""
        return self.num_experts is not None


_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_local_experts", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size")


def _check_size(model_type: Optional[str], name: str, value: Any) -> int:
    """``value`` as an int when it is an integer >= 1.

    Raises:
        ModelConfigError: otherwise (naming the config field).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ModelConfigError(f"{model_type} config: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def parse_hf_config(hf_config: dict) -> ArchSpec:
    """Read and validate the architecture of an HF config.

    Args:
        hf_config: the raw ``config.json`` dict (legacy ``rope_theta``/``rope_scaling`` fields are accepted).

    Returns:
        The :class:`ArchSpec`.

    Raises:
        UnsupportedModelError: unsupported ``model_type``, activation, bias layout, RoPE scaling type, sliding
            window attention, or MoE router detail (one line naming the field).
        ModelConfigError: a size field (``hidden_size``, ``num_attention_heads``, ...) that is not an integer >= 1.
    """
    for name in _SIZE_FIELDS:  # before transformers divides by them
        if hf_config.get(name) is not None:
            _check_size(hf_config.get("model_type"), name, hf_config[name])
    cfg = _normalized(hf_config)
    model_type = hf_config["model_type"]

    def need(name: str) -> Any:
        if cfg.get(name) is None:
            raise UnsupportedModelError(f"{model_type} config has no {name!r}")
        return cfg[name]

    def size(name: str) -> int:
        return _check_size(model_type, name, need(name))

    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu' / SwiGLU)")
    if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UnsupportedModelError(
            "llama attention_bias / mlp_bias = true is not supported (megatron-core cannot bias o_proj and the MLP "
            "independently of each other)")
    if cfg.get("use_sliding_window") or (model_type == "mixtral" and cfg.get("sliding_window")):
        raise UnsupportedModelError(f"sliding-window attention (sliding_window={cfg.get('sliding_window')}) "
                                    "is not supported")
    hidden = size("hidden_size")
    heads = size("num_attention_heads")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    if kv_heads <= 0 or heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

    rope = dict(cfg.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported (supported: default, llama3, linear)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise UnsupportedModelError(f"{model_type} config has no rope_theta")

    num_layers = size("num_hidden_layers")
    num_experts = None
    moe_topk, moe_ffn, shared_ffn, shared_gate, pre_softmax, pattern = 0, None, None, False, False, None
    if model_type == "mixtral":
        num_experts = size("num_local_experts")
        moe_topk = size("num_experts_per_tok")
        moe_ffn = size("intermediate_size")
        pattern = (1,) * num_layers
    elif model_type == "qwen2_moe":
        num_experts = size("num_experts")
        moe_topk = size("num_experts_per_tok")
        moe_ffn = size("moe_intermediate_size")
        shared_ffn = int(cfg.get("shared_expert_intermediate_size") or 0) or None
        if shared_ffn is None:
            raise UnsupportedModelError("qwen2_moe shared_expert_intermediate_size = 0 is not supported")
        shared_gate = True
        pre_softmax = not cfg.get("norm_topk_prob", False)
        if not cfg.get("qkv_bias", True):
            raise UnsupportedModelError("qwen2_moe qkv_bias = false is not supported")
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        pattern = tuple(int(i not in dense and (i + 1) % step == 0) for i in range(num_layers))
    if num_experts is not None and moe_topk > num_experts:
        raise UnsupportedModelError(f"num_experts_per_tok {moe_topk} > number of experts {num_experts}")

    return ArchSpec(
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=int(head_dim),
        ffn_hidden_size=size("intermediate_size"),
        vocab_size=size("vocab_size"),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type in ("qwen2", "qwen2_moe"),
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
        init_std=float(cfg.get("initializer_range") or 0.02),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        num_experts=num_experts,
        moe_topk=moe_topk,
        moe_ffn_hidden_size=moe_ffn,
        moe_shared_ffn_hidden_size=shared_ffn,
        moe_shared_expert_gate=shared_gate,
        moe_pre_softmax=pre_softmax,
        moe_layer_pattern=pattern,
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
        dtype=hf_config.get("dtype") or hf_config.get("torch_dtype"),
    )


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_model_parallel_size: Optional[int] = None) -> int:
    """Megatron's vocabulary padding: ``ceil(vocab / (divisible_by * TP)) * divisible_by * TP``.

    Args:
        vocab_size: the real vocabulary size.
        make_vocab_size_divisible_by: Megatron's ``--make-vocab-size-divisible-by`` (default 128).
        tensor_model_parallel_size: TP; None reads it from megatron-core's parallel state (1 if uninitialised).

    Raises:
        ValueError: a non-positive size.
    """
    if vocab_size < 1 or make_vocab_size_divisible_by < 1:
        raise ValueError(f"vocab size {vocab_size} and --make-vocab-size-divisible-by "
                         f"{make_vocab_size_divisible_by} must be >= 1")
    if tensor_model_parallel_size is None:
        from megatron.core import parallel_state

        tensor_model_parallel_size = (parallel_state.get_tensor_model_parallel_world_size()
                                      if parallel_state.model_parallel_is_initialized() else 1)
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)
