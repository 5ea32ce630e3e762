"""Build megatron-core ``GPTModel`` s from Hugging Face ``config.json`` files.

Supported families (``model_type`` in ``config.json``):

* ``llama``: Llama 2 / 3.x (incl. ``llama3`` and ``linear`` RoPE scaling) and SmolLM2 (tied embeddings),
* ``qwen2``: Qwen2 / Qwen2.5 (bias on the Q/K/V projections),
* ``mixtral``: Mixtral mixture of experts (top-k softmax router, renormalised top-k weights),
* ``qwen2_moe``: Qwen1.5-MoE / Qwen2-MoE (shared expert with a sigmoid gate, optional dense layers).

All are pre-norm decoders with RMSNorm, SwiGLU MLPs, rotary embeddings and grouped-query attention; they map onto
megatron-core's ``TransformerConfig`` as follows (HF field -> megatron-core field):

``hidden_size`` -> ``hidden_size``, ``num_hidden_layers`` -> ``num_layers``, ``num_attention_heads`` ->
``num_attention_heads``, ``num_key_value_heads`` -> ``num_query_groups``, ``head_dim`` -> ``kv_channels``,
``intermediate_size`` -> ``ffn_hidden_size``, ``rms_norm_eps`` -> ``layernorm_epsilon``, ``rope_theta`` ->
``rotary_base`` (a ``GPTModel`` argument), ``tie_word_embeddings`` -> ``share_embeddings_and_output_weights``,
``attention_dropout`` -> ``attention_dropout`` (hidden dropout is 0 as in HF), ``initializer_range`` ->
``init_method_std``; for experts ``num_local_experts``/``num_experts`` -> ``num_moe_experts``,
``num_experts_per_tok`` -> ``moe_router_topk``, ``moe_intermediate_size`` -> ``moe_ffn_hidden_size``,
``shared_expert_intermediate_size`` -> ``moe_shared_expert_intermediate_size`` (+ ``moe_shared_expert_gate``),
``norm_topk_prob=False`` -> ``moe_router_pre_softmax=True``, ``router_aux_loss_coef`` -> ``moe_aux_loss_coeff``.

Conventions of the built models (the trainer relies on them):

* Inputs are batch-first: ``input_ids [batch, seq]`` (int64), ``position_ids [batch, seq]`` and
  ``attention_mask [batch, 1, seq, seq]`` bool with **True = masked** (see :func:`build_attention_mask`), or None
  for a plain causal mask (local layer spec only).
* RoPE is applied at positions ``0 .. seq-1`` of the row; ``position_ids`` are passed to ``GPTModel`` but rotary
  embeddings do not read them. For left-padded rows this gives the same attention scores on the valid tokens as
  HF's shifted positions, because RoPE scores depend only on the offset between query and key.
* The causal-LM returns logits ``[batch, seq, padded_vocab / TP]`` (vocabulary-parallel; pass
  ``runtime_gather_output=True`` for the full padded vocabulary) on the last pipeline stage; entries beyond the
  real vocabulary (``model.real_vocab_size``, see :func:`real_vocab_size`) come from zero rows and must be
  dropped (``logits[..., :vocab_size]`` after gathering) or masked by the caller.
* The value model (:mod:`posttrain.models.value_model`) returns ``values [batch, seq]`` fp32 on the last stage.
* Other pipeline stages return hidden states ``[seq, batch, hidden]``; ``model.set_input_tensor`` feeds them in,
  as the megatron-core pipeline schedules expect.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from megatron.core.utils import (
    unwrap_model,  # strips DDP and Float16Module wrappers (re-exported)
)

from posttrain.models.hf_config import (  # noqa: F401  (the HF configuration side, re-exported)
    SUPPORTED_MODEL_TYPES,
    MODEL_KINDS,
    ParallelLayoutError,
    ModelConfigError,
    UnsupportedModelError,
    load_hf_config,
    ArchSpec,
    parse_hf_config,
    padded_vocab_size,
)


# ----------------------------------------------------------------------------------------------------------------
# TransformerConfig
# ----------------------------------------------------------------------------------------------------------------


def _parallel_sizes() -> tuple[int, int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron-core parallel state is not initialised: call "
                           "posttrain.distributed.initialize_distributed() first")
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size())


PARALLEL_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size")


def validate_parallel_layout(arch: ArchSpec, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                             expert_model_parallel_size: int = 1, flag_names: tuple = PARALLEL_FLAGS) -> None:
    """Check that the model can be split over TP / PP / EP.

    Args:
        arch: the architecture. tensor_model_parallel_size, pipeline_model_parallel_size,
        expert_model_parallel_size: the layout. flag_names: how the three sizes are called in error messages.

    Raises:
        ParallelLayoutError: one line naming the flag and the HF field that do not divide (or a size < 1).
    """
    tp_flag, pp_flag, ep_flag = flag_names
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    for flag, size in ((tp_flag, tp), (pp_flag, pp), (ep_flag, ep)):
        if size < 1:
            raise ParallelLayoutError(f"{flag} must be >= 1, got {size}")
    checks = [
        (tp_flag, tp, "num_attention_heads", arch.num_attention_heads),
        (tp_flag, tp, "num_key_value_heads", arch.num_query_groups),
        (tp_flag, tp, "intermediate_size", arch.ffn_hidden_size),
        (pp_flag, pp, "num_hidden_layers", arch.num_layers),
    ]
    if arch.is_moe:
        checks += [(ep_flag, ep, "number of experts", arch.num_experts),
                   (tp_flag, tp, "expert intermediate size", arch.moe_ffn_hidden_size)]
        if arch.moe_shared_ffn_hidden_size:
            checks.append((tp_flag, tp, "shared_expert_intermediate_size", arch.moe_shared_ffn_hidden_size))
    elif ep != 1:
        raise ParallelLayoutError(f"{ep_flag} {ep} needs a mixture-of-experts model ({arch.model_type} is dense)")
    for flag, size, field, value in checks:
        if value % size:
            raise ParallelLayoutError(f"{flag} {size} does not divide {field} {value}")


def transformer_config_from_hf(hf_config: dict, *, bf16: bool = False, **overrides: Any):
    """Build megatron-core's ``TransformerConfig`` for an HF config, for the current parallel layout.

    TP / PP / EP sizes are read from megatron-core's parallel state (set up by
    :func:`posttrain.distributed.initialize_distributed`). On CPU, weights are initialised on the CPU
    (``use_cpu_initialization=True``); on GPU megatron-core initialises them on the device.

    Args:
        hf_config: the raw ``config.json`` dict.
        bf16: run in bfloat16 (``bf16=True``, ``params_dtype=bfloat16``; :func:`build_model` then wraps the model
            in megatron-core's ``Float16Module``).
        **overrides: any ``TransformerConfig`` field, applied last (e.g. ``recompute_granularity``,
            ``moe_aux_loss_coeff``, ``moe_router_load_balancing_type``, ``perform_initialization``).

    Returns:
        A ``megatron.core.transformer.TransformerConfig``.

    Raises:
        UnsupportedModelError: see :func:`parse_hf_config`.
        ParallelLayoutError: TP / PP / EP does not divide the model (see :func:`validate_parallel_layout`).
        ValueError: an override names no ``TransformerConfig`` field.
        RuntimeError: the parallel state is not initialised.
    """
    import dataclasses

    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    arch = parse_hf_config(hf_config)
    tp, pp, ep = _parallel_sizes()
    validate_parallel_layout(arch, tp, pp, ep)
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        init_method_std=arch.init_std,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
    )
    if arch.is_moe:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_layer_freq=list(arch.moe_layer_pattern),
            moe_router_pre_softmax=arch.moe_pre_softmax,
            moe_router_score_function="softmax",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=arch.router_aux_loss_coef,
            moe_router_dtype="fp32",
            moe_shared_expert_intermediate_size=arch.moe_shared_ffn_hidden_size,
            moe_shared_expert_gate=arch.moe_shared_expert_gate,
            moe_shared_expert_overlap=False,
        )
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TransformerConfig field(s): {', '.join(unknown)}")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def build_attention_mask(attention_mask_2d: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask in megatron-core's convention.

    Query ``i`` may attend to key ``j`` when ``j <= i`` and key ``j`` is a real token. A padding query (which
    would otherwise see no key at all) is allowed to attend to itself, so no softmax row is empty: its output is
    meaningless but finite, and it never reaches a real token. Works for left and right padding.

    Args:
        attention_mask_2d: ``[batch, seq]``, 1 / True for real tokens, 0 / False for padding (HF convention).

    Returns:
        ``[batch, 1, seq, seq]`` bool, **True = masked** (megatron-core's convention), on the input's device.

    Raises:
        ValueError: the input is not 2-D.
    """
    if attention_mask_2d.dim() != 2:
        raise ValueError(f"attention_mask_2d must be [batch, seq], got shape {tuple(attention_mask_2d.shape)}")
    valid = attention_mask_2d.bool()
    seq = valid.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).tril_()
    allowed = causal[None, :, :] & valid[:, None, :]
    allowed |= torch.eye(seq, dtype=torch.bool, device=valid.device)[None]
    return (~allowed).unsqueeze(1)


def position_ids_from_attention_mask(attention_mask_2d: torch.Tensor) -> torch.Tensor:
    """Position ids ``[batch, seq]`` (int64): 0 over left padding, then 0, 1, ... over the real tokens.

    The convention of MindSpeed-LLM's PPO and of HF ``generate``; the models accept these ids (see the module
    docstring on how RoPE uses positions).
    """
    mask = attention_mask_2d.long()
    return (mask.cumsum(-1) - 1).clamp_(min=0)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def transformer_engine_available() -> bool:
    """True when Transformer Engine is importable and CUDA is present (then the TE layer spec is used)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def _patch_moe_router_without_te() -> None:
    """megatron-core 0.16.1 reads ``moe_utils.te_general_gemm`` in the router even when Transformer Engine failed
    to import (then the name is undefined and every MoE forward raises ``NameError``); define it as None so the
    router takes its torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _layer_spec(config, use_te: bool):
    """Per-layer specs for this pipeline stage (dense and MoE layers as ``moe_layer_freq`` says)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.enums import AttnMaskType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if use_te:
        # TE ignores attention_mask under the "causal" mask type; "arbitrary" honours the explicit causal +
        # padding mask the trainer passes for left-padded rows.
        for layer in spec.layer_specs:
            layer.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    elif not torch.cuda.is_available():
        # on CPU, torch's fused attention kernel instead of megatron's unfused local one (same function)
        from posttrain.models.sdpa_attention import SDPADotProductAttention

        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
        # and a SwiGLU that keeps only its input for the backward (same function and gradients, less memory)
        # (dense models only: megatron's switch below would also reach MoE experts, which keep the unfused ops)
        if (config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
                and not config.num_moe_experts and not config.bias_activation_fusion
                and config.activation_func_clamp_value is None and not config.glu_linear_offset):
            from posttrain.models.swiglu import MemoryEfficientSwiGLU

            for layer in spec.layer_specs:
                layer.submodules.mlp.submodules.activation_func = MemoryEfficientSwiGLU
            # megatron-core's switch for a module-valued activation (MLP then hands it the whole fc1 output)
            config.use_te_activation_func = True
    return spec


def _release_cheap_activations(model: torch.nn.Module) -> None:
    """CPU layer spec: free each layer's norm outputs and SwiGLU output once their consumer (attention, MLP) has
    run, and recompute them for its backward (:mod:`posttrain.models.output_release`)."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from posttrain.models.output_release import release_output_after
    from posttrain.models.swiglu import MemoryEfficientSwiGLU

    for layer in model.modules():
        if not isinstance(layer, TransformerLayer):
            continue
        if not isinstance(layer.input_layernorm, IdentityOp) and not isinstance(layer.self_attention, IdentityOp):
            release_output_after(layer.input_layernorm, layer.self_attention)
        if not isinstance(layer.pre_mlp_layernorm, IdentityOp) and not isinstance(layer.mlp, IdentityOp):
            release_output_after(layer.pre_mlp_layernorm, layer.mlp)
        if isinstance(getattr(layer.mlp, "activation_func", None), MemoryEfficientSwiGLU):
            release_output_after(layer.mlp.activation_func, layer.mlp)


def _require_mask_hook(module, args, kwargs):
    mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
    if mask is None:
        raise ValueError("attention_mask is required with the Transformer Engine layer spec "
                         "(build it with posttrain.models.build_attention_mask)")


def build_model(hf_config: dict, kind: Literal["causal_lm", "value"] = "causal_lm", *, bf16: bool = False,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                make_vocab_size_divisible_by: int = 128, transformer_impl: str = "auto",
                parallel_output: bool = True, value_head_init_std: float = 0.02, value_head_seed: int = 1234,
                **config_overrides: Any) -> torch.nn.Module:
    """Build the megatron-core model of an HF config for this rank's pipeline stage.

    Args:
        hf_config: the raw ``config.json`` dict (see :func:`load_hf_config`).
        kind: ``causal_lm`` (``GPTModel`` with the LM output layer) or ``value``
            (:class:`posttrain.models.value_model.GPTValueModel`, scalar head).
        bf16: bfloat16 parameters, wrapped in megatron-core's ``Float16Module`` (which casts outputs of the last
            stage back to fp32). The value head holds bf16 weights and computes in fp32.
        pre_process / post_process: whether this stage holds the embedding / the final norm and head; None means
            "first / last pipeline stage" from megatron-core's parallel state.
        make_vocab_size_divisible_by: vocabulary padding (see :func:`padded_vocab_size`).
        transformer_impl: ``auto`` (Transformer Engine spec when TE is importable and CUDA present, else the local
            spec), ``local`` or ``transformer_engine``.
        parallel_output: keep logits vocabulary-parallel (the default; override per call with
            ``runtime_gather_output=True``).
        value_head_init_std, value_head_seed: initialisation of a fresh value head (``kind="value"``).
        **config_overrides: ``TransformerConfig`` fields (see :func:`transformer_config_from_hf`).

    Returns:
        The model; a ``Float16Module`` when ``bf16`` (its ``.module`` is the ``GPTModel``; :func:`unwrap_model`
        returns it in every case). The inner model carries its :class:`ModelInfo` as ``posttrain_info`` (read
        it with :func:`model_info`); its ``vocab_size`` is the padded size.

    Raises:
        UnsupportedModelError, ValueError, RuntimeError: see :func:`transformer_config_from_hf`; also an unknown
            ``kind`` / ``transformer_impl``, or ``transformer_engine`` requested without TE and CUDA.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not supported (supported: {', '.join(MODEL_KINDS)})")
    if transformer_impl not in ("auto", "local", "transformer_engine"):
        raise ValueError(f"transformer_impl {transformer_impl!r} must be auto, local or transformer_engine")
    use_te = transformer_engine_available() if transformer_impl == "auto" else transformer_impl != "local"
    if use_te and not transformer_engine_available():
        raise ValueError("transformer_impl=transformer_engine needs Transformer Engine and CUDA")

    arch = parse_hf_config(hf_config)
    config = transformer_config_from_hf(hf_config, bf16=bf16, **config_overrides)
    if arch.is_moe:
        _patch_moe_router_without_te()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    padded = padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, config.tensor_model_parallel_size)
    rope_kwargs: dict[str, Any] = {}
    if arch.rope_type == "llama3":
        rope_kwargs = dict(rope_scaling=True, rope_scaling_factor=arch.rope_factor)
    elif arch.rope_type == "linear":
        rope_kwargs = dict(seq_len_interpolation_factor=arch.rope_factor)
    common = dict(
        config=config,
        transformer_layer_spec=_layer_spec(config, use_te),
        vocab_size=padded,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        **rope_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's "Apex is not installed" fallbacks
        if kind == "causal_lm":
            model = GPTModel(share_embeddings_and_output_weights=arch.tie_word_embeddings, **common)
        else:
            from posttrain.models.value_model import GPTValueModel

            model = GPTValueModel(head_init_std=value_head_init_std, head_seed=value_head_seed, **common)
    if arch.rope_type == "llama3" and (arch.rope_low_freq_factor, arch.rope_high_freq_factor,
                                       arch.rope_original_max_position_embeddings) != (1.0, 4.0, 8192):
        _set_llama3_inv_freq(model, arch)
    every_layer_recomputed = config.recompute_granularity == "full" and (
        config.recompute_method == "uniform" or (config.recompute_num_layers or 0) >= config.num_layers)
    if not use_te and not torch.cuda.is_available() and not every_layer_recomputed:
        # (where every layer is recomputed as a whole, a layer's activations live for its own backward only)
        _release_cheap_activations(model)
    model.posttrain_info = ModelInfo(hf_config=dict(hf_config), kind=kind, vocab_size=arch.vocab_size,
                                     padded_vocab_size=padded,
                                     make_vocab_size_divisible_by=make_vocab_size_divisible_by, transformer_impl="transformer_engine" if use_te
                                     else "local")
    if use_te:
        model.register_forward_pre_hook(_require_mask_hook, with_kwargs=True)
    if bf16:
        # The value head's weights stay bf16 like every other parameter (megatron's mixed-precision optimiser
        # keeps fp32 master copies of bf16 parameters only and rejects fp32 ones in its checkpoint); the head
        # still computes in fp32 (ValueHead.forward).
        model = Float16Module(config, model)
    return model


def _set_llama3_inv_freq(model, arch: ArchSpec) -> None:
    """Llama 3 RoPE scaling with non-default low/high frequency factors or original context length."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    dim = arch.kv_channels
    base = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device)
                                      / dim))
    rotary.inv_freq = rotary._apply_scaling(
        base, factor=arch.rope_factor, low_freq_factor=arch.rope_low_freq_factor,
        high_freq_factor=arch.rope_high_freq_factor,
        original_max_position_embeddings=arch.rope_original_max_position_embeddings)


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`build_model` knows about a model beyond megatron's ``TransformerConfig`` (which stays
    ``model.config``, megatron-core's own attribute); stored once as the inner model's ``posttrain_info``.

    Attributes:
        hf_config: the raw HF ``config.json`` dict the model was built from (what checkpoints store).
        kind: ``causal_lm`` or ``value``.
        vocab_size: the real vocabulary size; padded_vocab_size: the embedding rows, a multiple of
            ``make_vocab_size_divisible_by`` x TP.
        transformer_impl: ``local`` or ``transformer_engine``, the layer spec in use.
    """

    hf_config: dict
    kind: str
    vocab_size: int
    padded_vocab_size: int
    make_vocab_size_divisible_by: int
    transformer_impl: str


def model_info(model: torch.nn.Module) -> Optional[ModelInfo]:
    """The :class:`ModelInfo` of a model from :func:`build_model` (any wrapper); None for other modules."""
    return getattr(unwrap_model(model), "posttrain_info", None)


def real_vocab_size(model: torch.nn.Module) -> int:
    """The unpadded vocabulary size of a model from :func:`build_model`: slice gathered logits with it."""
    return model_info(model).vocab_size
