"""Weight mapping between Hugging Face checkpoints and megatron-core ``GPTModel`` state dicts (TP = PP = EP = 1).

Every mapping is a :class:`Rule`: one megatron-core tensor made from one or more HF tensors, with the exact inverse.
Both directions only concatenate, split and cast, so HF -> megatron-core -> HF reproduces every tensor bit for bit
(casts between the checkpoint dtype and fp32 are exact).

Names (``i`` = layer, ``e`` = expert; megatron-core names are those of the local layer spec):

============================================================  ===============================================
megatron-core                                                 Hugging Face
============================================================  ===============================================
``embedding.word_embeddings.weight`` [V_pad, h]                ``model.embed_tokens.weight`` [V, h] (zero rows)
``decoder.layers.i.input_layernorm.weight``                   ``model.layers.i.input_layernorm.weight``
``decoder.layers.i.self_attention.linear_qkv.weight|bias``    ``...self_attn.{q,k,v}_proj.weight|bias``: per KV
                                                              group ``[q heads of the group; k; v]``
``decoder.layers.i.self_attention.linear_proj.weight``        ``...self_attn.o_proj.weight``
``decoder.layers.i.pre_mlp_layernorm.weight``                 ``...post_attention_layernorm.weight``
``decoder.layers.i.mlp.linear_fc1.weight``                    ``[mlp.gate_proj; mlp.up_proj]``
``decoder.layers.i.mlp.linear_fc2.weight``                    ``mlp.down_proj``
``decoder.layers.i.mlp.router.weight``                        ``block_sparse_moe.gate`` (Mixtral), ``mlp.gate``
``...mlp.experts.local_experts.e.linear_fc1.weight``          ``[w1; w3]`` (Mixtral), ``[gate_proj; up_proj]``
``...mlp.experts.local_experts.e.linear_fc2.weight``          ``w2`` (Mixtral), ``down_proj``
``...mlp.shared_experts.linear_fc1|linear_fc2.weight``        ``mlp.shared_expert.*`` (Qwen2-MoE)
``...mlp.shared_experts.gate_weight`` [1, h]                   ``mlp.shared_expert_gate.weight``
``decoder.final_layernorm.weight``                            ``model.norm.weight``
``output_layer.weight`` [V_pad, h] (untied causal LM)          ``lm_head.weight`` [V, h]
``value_head.linear.weight`` [1, h] / ``.bias`` [1]           ``score.weight`` [1, h] / no bias (must be 0)
============================================================  ===============================================

HF checkpoints are read from ``*.safetensors`` (one file, or shards listed in ``model.safetensors.index.json``)
with per-expert tensors, the layout of the Hugging Face Hub and of ``save_pretrained``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from posttrain.errors import InputError, InputFileNotFoundError
from posttrain.models.provider import ArchSpec

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

HF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeForSequenceClassification"),
}
"""HF class names per ``model_type``: (causal LM, sequence classifier)."""

# Tensors some HF checkpoints carry that hold no weights of their own.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class MappingError(InputError, ValueError):
    """An HF checkpoint or a megatron-core state dict does not fit the model (message names the file / tensor)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing safetensors
# ----------------------------------------------------------------------------------------------------------------


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory (``safetensors`` only).

    Args:
        directory: the HF model directory.

    Every file's header is read when the reader is made, so an empty, truncated or corrupt file (safetensors
    checks that the header covers the whole file) fails here, before anything is converted.

    Raises:
        FileNotFoundError: no ``model.safetensors`` / index, or a shard named by the index is missing.
        MappingError: the index is not valid JSON; a file is empty, truncated or not safetensors; a shard lacks a
            tensor the index assigns to it.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / SAFE_INDEX
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise MappingError(f"{index}: not a valid safetensors index ({exc})") from None
            for name, shard in weight_map.items():
                path = self.directory / shard
                if not path.is_file():
                    raise InputFileNotFoundError(f"{path}: shard listed in {SAFE_INDEX} is missing")
                self._where[name] = path
            for path in sorted(set(self._where.values())):
                stored = set(self._open(path).keys())
                missing = sorted(name for name, where in self._where.items() if where == path and name not in stored)
                if missing:
                    raise MappingError(f"{path}: has no tensor {missing[0]} (listed for it in {SAFE_INDEX})")
        else:
            path = self.directory / SAFE_SINGLE
            if not path.is_file():
                files = sorted(self.directory.glob("*.safetensors"))
                if len(files) != 1:
                    raise InputFileNotFoundError(
                        f"{self.directory}: no {SAFE_SINGLE} or {SAFE_INDEX} (only safetensors checkpoints are read)")
                path = files[0]
            self._where = {name: path for name in self._open(path).keys()}

    def _open(self, path: Path):
        """The open ``safe_open`` handle of one file (its header is read and checked here).

        Raises:
            MappingError: the file is empty, truncated or not a safetensors file.
        """
        from safetensors import SafetensorError, safe_open

        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except SafetensorError as exc:
                size = path.stat().st_size
                raise MappingError(f"{path}: not a readable safetensors file ({size} bytes; {exc}): it is empty, "
                                   "truncated or corrupt") from None
        return self._handles[path]

    def _file_label(self, name: str) -> str:
        return str(self._where[name]) if name in self._where else str(self.directory)

    def keys(self) -> set[str]:
        """All tensor names."""
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading it."""
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor.

        Raises:
            MappingError: the checkpoint has no tensor of that name.
        """
        if name not in self._where:
            raise MappingError(f"{self.directory}: checkpoint has no tensor {name!r}")
        return self._open(self._where[name]).get_tensor(name)


def save_hf_safetensors(tensors: Mapping[str, torch.Tensor], directory: str | Path,
                        max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write tensors as HF does: ``model.safetensors``, or shards plus ``model.safetensors.index.json``.

    Args:
        tensors: name -> tensor (made contiguous and unshared before writing).
        directory: an existing directory.
        max_shard_bytes: largest shard (default 5 GiB, as ``save_pretrained``).

    Returns:
        The written file names.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    plan: list[list[str]] = [[]]
    size = total = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
        total += nbytes
    # one shard in memory at a time (contiguous, unshared copies as safetensors requires)
    names = [SAFE_SINGLE] if len(plan) == 1 else [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
                                                  for k in range(len(plan))]
    weight_map = {}
    for fname, keys in zip(names, plan):
        shard = {key: tensors[key].detach().contiguous().clone() for key in keys}
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({key: fname for key in keys})
        del shard
    if len(plan) == 1:
        return names
    (directory / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True))
    return names + [SAFE_INDEX]


# ----------------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One megatron-core tensor <-> its HF source tensors.

    Attributes:
        mcore: megatron-core state-dict key (TP = PP = EP = 1, local spec).
        hf: HF tensor names.
        hf_shapes: the expected shape of each HF tensor.
        to_mcore: HF tensors -> megatron-core tensor.
        to_hf: megatron-core tensor -> HF tensors (same order as ``hf``).
    """

    mcore: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_mcore: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]


def _identity(name: str, mcore: str, shape: tuple[int, ...]) -> Rule:
    return Rule(mcore, (name,), (shape,), lambda t: t[0], lambda m: [m])


def _concat(names: tuple[str, ...], mcore: str, shapes: tuple[tuple[int, ...], ...]) -> Rule:
    sizes = [s[0] for s in shapes]
    return Rule(mcore, names, shapes, lambda t: torch.cat(t, dim=0), lambda m: list(torch.split(m, sizes, dim=0)))


def _vocab(name: str, mcore: str, vocab: int, hidden: int, padded: int) -> Rule:
    def to_mcore(t):
        out = t[0].new_zeros((padded, hidden))
        out[:vocab] = t[0]
        return out

    return Rule(mcore, (name,), ((vocab, hidden),), to_mcore, lambda m: [m[:vocab]])


def _qkv(prefix: str, mcore: str, arch: ArchSpec, bias: bool) -> Rule:
    groups, heads, d, h = arch.num_query_groups, arch.num_attention_heads, arch.kv_channels, arch.hidden_size
    per_group = heads // groups
    tail = () if bias else (h,)
    suffix = "bias" if bias else "weight"
    names = tuple(f"{prefix}.{p}_proj.{suffix}" for p in ("q", "k", "v"))
    shapes = ((heads * d, *tail), (groups * d, *tail), (groups * d, *tail))

    def to_mcore(t):
        q, k, v = t
        q = q.reshape(groups, per_group * d, *tail)
        k = k.reshape(groups, d, *tail)
        v = v.reshape(groups, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, *tail)

    def to_hf(m):
        m = m.reshape(groups, (per_group + 2) * d, *tail)
        q, k, v = torch.split(m, [per_group * d, d, d], dim=1)
        return [q.reshape(heads * d, *tail), k.reshape(groups * d, *tail), v.reshape(groups * d, *tail)]

    return Rule(mcore, names, shapes, to_mcore, to_hf)


def _swiglu(gate: str, up: str, down: str, mcore_prefix: str, hidden: int, ffn: int) -> list[Rule]:
    return [
        _concat((gate, up), f"{mcore_prefix}.linear_fc1.weight", ((ffn, hidden), (ffn, hidden))),
        _identity(down, f"{mcore_prefix}.linear_fc2.weight", (hidden, ffn)),
    ]


def build_rules(arch: ArchSpec, model_kind: str, padded_vocab_size: int, *,
                include_value_head: bool = True, value_head_bias: bool = False) -> list[Rule]:
    """All rules for a model (full model at TP = PP = EP = 1).

    Args:
        arch: the architecture (:func:`posttrain.models.provider.parse_hf_config`).
        model_kind: ``causal_lm`` (``lm_head`` unless tied) or ``value`` (``score`` head).
        padded_vocab_size: rows of the megatron-core embedding / output layer.
        include_value_head: include ``score.weight`` (False when the value head is freshly initialised).
        value_head_bias: include ``score.bias`` too (``*ForTokenClassification``, whose score layer has a bias).

    Returns:
        The rules, in model order.
    """
    h, v = arch.hidden_size, arch.vocab_size
    d, heads = arch.kv_channels, arch.num_attention_heads
    rules = [_vocab("model.embed_tokens.weight", "embedding.word_embeddings.weight", v, h, padded_vocab_size)]
    pattern = arch.moe_layer_pattern or (0,) * arch.num_layers
    for i in range(arch.num_layers):
        hf, mc = f"model.layers.{i}", f"decoder.layers.{i}"
        rules.append(_identity(f"{hf}.input_layernorm.weight", f"{mc}.input_layernorm.weight", (h,)))
        rules.append(_qkv(f"{hf}.self_attn", f"{mc}.self_attention.linear_qkv.weight", arch, bias=False))
        if arch.qkv_bias:
            rules.append(_qkv(f"{hf}.self_attn", f"{mc}.self_attention.linear_qkv.bias", arch, bias=True))
        rules.append(_identity(f"{hf}.self_attn.o_proj.weight", f"{mc}.self_attention.linear_proj.weight",
                               (h, heads * d)))
        rules.append(_identity(f"{hf}.post_attention_layernorm.weight", f"{mc}.pre_mlp_layernorm.weight", (h,)))
        if not pattern[i]:
            rules += _swiglu(f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight", f"{hf}.mlp.down_proj.weight",
                             f"{mc}.mlp", h, arch.ffn_hidden_size)
            continue
        ffn, experts = arch.moe_ffn_hidden_size, arch.num_experts
        if arch.model_type == "mixtral":
            moe = f"{hf}.block_sparse_moe"
            rules.append(_identity(f"{moe}.gate.weight", f"{mc}.mlp.router.weight", (experts, h)))
            for e in range(experts):
                rules += _swiglu(f"{moe}.experts.{e}.w1.weight", f"{moe}.experts.{e}.w3.weight",
                                 f"{moe}.experts.{e}.w2.weight", f"{mc}.mlp.experts.local_experts.{e}", h, ffn)
        else:
            moe = f"{hf}.mlp"
            rules.append(_identity(f"{moe}.gate.weight", f"{mc}.mlp.router.weight", (experts, h)))
            for e in range(experts):
                rules += _swiglu(f"{moe}.experts.{e}.gate_proj.weight", f"{moe}.experts.{e}.up_proj.weight",
                                 f"{moe}.experts.{e}.down_proj.weight", f"{mc}.mlp.experts.local_experts.{e}", h, ffn)
            if arch.moe_shared_ffn_hidden_size:
                rules += _swiglu(f"{moe}.shared_expert.gate_proj.weight", f"{moe}.shared_expert.up_proj.weight",
                                 f"{moe}.shared_expert.down_proj.weight", f"{mc}.mlp.shared_experts", h,
                                 arch.moe_shared_ffn_hidden_size)
            if arch.moe_shared_expert_gate:
                rules.append(_identity(f"{moe}.shared_expert_gate.weight", f"{mc}.mlp.shared_experts.gate_weight",
                                       (1, h)))
    rules.append(_identity("model.norm.weight", "decoder.final_layernorm.weight", (h,)))
    if model_kind == "causal_lm":
        if not arch.tie_word_embeddings:
            rules.append(_vocab("lm_head.weight", "output_layer.weight", v, h, padded_vocab_size))
    elif include_value_head:
        rules.append(_identity("score.weight", "value_head.linear.weight", (1, h)))
        if value_head_bias:
            rules.append(_identity("score.bias", "value_head.linear.bias", (1,)))
    return rules


def _has_score_bias(reader: HFCheckpointReader, model_kind: str, include_value_head: bool) -> bool:
    """A value model read from an HF ``*ForTokenClassification`` checkpoint (its ``score`` has a bias)."""
    return model_kind == "value" and include_value_head and "score.bias" in reader.keys()


def detect_hf_head(keys: Iterable[str]) -> str:
    """``value`` when the checkpoint has a ``score`` head (``*ForSequenceClassification`` or
    ``*ForTokenClassification``), else ``causal_lm``."""
    return "value" if "score.weight" in set(keys) else "causal_lm"


def check_hf_checkpoint(reader: HFCheckpointReader, arch: ArchSpec, model_kind: str, padded_vocab_size: int, *,
                        include_value_head: bool = True) -> None:
    """Check names and shapes of an HF checkpoint's tensors against its config, reading no tensor data.

    Raises:
        MappingError: a tensor is missing, has the wrong shape, or is not used (the message names file and tensor).
    """
    rules = build_rules(arch, model_kind, padded_vocab_size, include_value_head=include_value_head,
                        value_head_bias=_has_score_bias(reader, model_kind, include_value_head))
    _check_hf_tensors(reader, arch, model_kind, rules, include_value_head)


def _check_hf_tensors(reader: HFCheckpointReader, arch: ArchSpec, model_kind: str, rules: list[Rule],
                      include_value_head: bool) -> None:
    keys = reader.keys()
    used: set[str] = set()
    for rule in rules:
        for name, shape in zip(rule.hf, rule.hf_shapes):
            if name not in keys:
                raise MappingError(f"{reader.directory}: tensor {name} is missing from the checkpoint "
                                   f"(config.json describes a {arch.model_type} model it does not contain)")
            got = reader.shape(name)
            if got != shape:
                raise MappingError(
                    f"{reader._file_label(name)}: tensor {name} has shape {list(got)} but config.json implies "
                    f"{list(shape)} (hidden_size {arch.hidden_size}, vocab_size {arch.vocab_size})")
            used.add(name)
    allowed_extra = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    if model_kind == "value" and not include_value_head:
        allowed_extra.add("lm_head.weight")
    extra = sorted(k for k in keys - used - allowed_extra if not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise MappingError(f"{reader.directory}: tensors not used by a {arch.model_type} {model_kind} model: "
                           f"{', '.join(extra[:3])}{more}")


def hf_to_mcore(reader: HFCheckpointReader, arch: ArchSpec, model_kind: str, padded_vocab_size: int, *,
                include_value_head: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Map an HF checkpoint to a megatron-core state dict (TP = PP = EP = 1).

    Every expected tensor must exist with the shape the config implies; tensors the model does not use make the
    conversion fail too (except ``lm_head.weight`` of tied models and rotary ``inv_freq`` buffers), so nothing is
    silently dropped.

    Args:
        reader: the HF checkpoint.
        arch: its architecture (from its ``config.json``).
        model_kind: target kind, ``causal_lm`` or ``value``.
        padded_vocab_size: embedding rows of the megatron-core model.
        include_value_head: read ``score.weight`` (value models converted from sequence classifiers).
        dtype: dtype of the returned tensors.

    Returns:
        megatron-core key -> tensor (no ``_extra_state`` entries; a value head bias of 0 when the head is read).

    Raises:
        MappingError: a tensor is missing, has the wrong shape, or is not used (the message names file and tensor).
    """
    bias = _has_score_bias(reader, model_kind, include_value_head)
    rules = build_rules(arch, model_kind, padded_vocab_size, include_value_head=include_value_head,
                        value_head_bias=bias)
    _check_hf_tensors(reader, arch, model_kind, rules, include_value_head)
    state = {}
    for rule in rules:
        state[rule.mcore] = rule.to_mcore([reader.get(name).to(dtype) for name in rule.hf])
    if model_kind == "value" and include_value_head and not bias:
        state["value_head.linear.bias"] = torch.zeros(1, dtype=dtype, device="cpu")
    return state


@torch.no_grad()
def load_hf_into_model(reader: HFCheckpointReader, model: torch.nn.Module, arch: ArchSpec, model_kind: str, *,
                       include_value_head: bool = True) -> None:
    """Copy an HF checkpoint into a full (TP = PP = EP = 1) megatron-core model, one tensor at a time.

    Same checks as :func:`hf_to_mcore`, but peak memory is the model plus one HF tensor. Every model weight must
    be covered (a fresh value head is left alone when ``include_value_head`` is False).

    Raises:
        MappingError: see :func:`hf_to_mcore`; or the model lacks a mapped weight / has a weight no rule fills.
    """
    params = model.state_dict(keep_vars=True)
    padded = params["embedding.word_embeddings.weight"].shape[0]
    bias = _has_score_bias(reader, model_kind, include_value_head)
    rules = build_rules(arch, model_kind, padded, include_value_head=include_value_head, value_head_bias=bias)
    _check_hf_tensors(reader, arch, model_kind, rules, include_value_head)
    filled = set()
    for rule in rules:
        if rule.mcore not in params:
            raise MappingError(f"the megatron-core model has no weight {rule.mcore}")
        target = params[rule.mcore]
        target.copy_(rule.to_mcore([reader.get(name).to(target.dtype) for name in rule.hf]))
        filled.add(rule.mcore)
    if model_kind == "value" and include_value_head and not bias:
        params["value_head.linear.bias"].zero_()
        filled.add("value_head.linear.bias")
    unfilled = [k for k, v in params.items() if isinstance(v, torch.Tensor) and k not in filled
                and not k.endswith("_extra_state") and not (k.startswith("value_head.") and not include_value_head)]
    if unfilled:
        raise MappingError(f"no HF tensor maps to megatron-core weight(s) {', '.join(unfilled[:3])}")


def mcore_to_hf(state: Mapping[str, torch.Tensor], arch: ArchSpec, model_kind: str, padded_vocab_size: int, *,
                dtype: Optional[torch.dtype] = None, value_head_bias: bool = False) -> dict[str, torch.Tensor]:
    """Map a megatron-core state dict (TP = PP = EP = 1) back to HF tensor names; vocabulary padding is dropped.

    Args:
        state: megatron-core key -> tensor (``_extra_state`` entries are ignored).
        arch: the architecture.
        model_kind: ``causal_lm`` or ``value`` (``value_head.linear.bias`` is not mapped unless
            ``value_head_bias``: HF sequence classifiers have no bias; the caller decides what a non-zero one means).
        value_head_bias: map the head bias to ``score.bias`` (``*ForTokenClassification``).
        padded_vocab_size: embedding rows of the megatron-core model.
        dtype: cast every tensor to this dtype (None keeps it).

    Returns:
        HF name -> tensor.

    Raises:
        MappingError: a megatron-core tensor is missing or has the wrong shape.
    """
    out = {}
    for rule in build_rules(arch, model_kind, padded_vocab_size, value_head_bias=value_head_bias):
        if rule.mcore not in state:
            raise MappingError(f"megatron-core state has no tensor {rule.mcore}")
        parts = rule.to_hf(state[rule.mcore])
        for name, shape, tensor in zip(rule.hf, rule.hf_shapes, parts):
            if tuple(tensor.shape) != shape:
                raise MappingError(f"megatron-core tensor {rule.mcore} gives {name} of shape {list(tensor.shape)}, "
                                   f"expected {list(shape)}")
            out[name] = tensor if dtype is None else tensor.to(dtype)
    return out
