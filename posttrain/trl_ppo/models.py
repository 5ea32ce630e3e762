"""The models of PPO and where scores come from: actor, reference, critic, reward model, reward function.

* :class:`PPOModels` builds the model slots from their checkpoints (actor and reference from ``--ref-model``;
  the critic, for ``--adv-estimator gae`` only, from ``--critic-model``, else ``--reward-model``, else the actor
  with a fresh value head; the reward model from ``--reward-model``), checks that they share one vocabulary, and
  resolves the stop and pad tokens.
* :class:`RewardFunction` loads a rule-based reward (``--reward-function module:callable``), calls it once on a
  probe batch at start-up, and checks every result it returns.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from posttrain.arguments import ArgumentError, ModelArgs, OptimizerArgs
from posttrain.errors import InputError
from posttrain.models.checkpoint import read_checkpoint_meta
from posttrain.models.value_model import checkpoint_score_pooling
from posttrain.training.slots import ModelSlot, build_model_slot
from posttrain.trl_ppo.config import PPOArgs


class RewardFunctionError(InputError, ValueError):
    """A ``--reward-function`` that cannot be loaded, raised, or returned something other than one finite number
    per response (the message names the function, the iteration and the offending row)."""


class RewardFunction:
    """A rule-based reward ``fn(prompts, responses, **columns) -> scores``.

    The callable receives the decoded prompts and responses (``list[str]`` of the same length, responses without
    special tokens) and, as keyword arguments, the dataset's extra columns it names in its signature (e.g.
    ``answer: list[str]``, one entry per response: the value of the row the response's prompt came from; all of
    them when it takes ``**kwargs``). A parameter with a default that the dataset lacks keeps its default. It
    returns one real number per response (a list, tuple, NumPy array or 1-D tensor); the score is added to the
    reward model's.

    Attributes:
        columns: the extra columns the function receives (in signature order).

    Args:
        spec: ``module:callable`` or ``path/to/file.py:callable`` (``--reward-function``).
        columns: the extra columns the prompt dataset provides.

    Raises:
        RewardFunctionError: malformed spec, module or attribute not found, not callable, or it asks for a
            column the dataset does not have.
    """

    def __init__(self, spec: str, columns: Sequence[str] = ()):
        self.spec = spec
        if ":" not in spec:
            raise RewardFunctionError(f"--reward-function {spec!r} must look like module:callable or file.py:callable")
        module_name, attr = spec.rsplit(":", 1)
        try:
            if module_name.endswith(".py"):
                loaded = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
                if loaded is None or not Path(module_name).is_file():
                    raise FileNotFoundError(f"no file {module_name}")
                module = importlib.util.module_from_spec(loaded)
                loaded.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
            self.fn = getattr(module, attr)
        except (ImportError, AttributeError, FileNotFoundError, SyntaxError) as exc:
            raise RewardFunctionError(f"--reward-function {spec}: {type(exc).__name__}: {exc}") from None
        if not callable(self.fn):
            raise RewardFunctionError(f"--reward-function {spec} is not callable")
        self.columns = self._wanted_columns(columns)

    def _wanted_columns(self, available: Sequence[str]) -> list[str]:
        """The extra columns the function asks for: parameters after ``(prompts, responses)``, or all of them
        when it takes ``**kwargs``."""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):  # a builtin or C callable without a signature: call it with two lists
            return []
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return list(available)
        named = [p for p in params[2:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY)]
        missing = [p.name for p in named if p.name not in available and p.default is inspect.Parameter.empty]
        if missing:
            raise RewardFunctionError(
                f"--reward-function {self.spec} takes {', '.join(missing)}, which the prompt dataset does not "
                f"provide (its extra columns: {', '.join(available) or 'none'}; keep them at preprocessing with "
                "--extra-columns)")
        return [p.name for p in named if p.name in available]

    def check_columns(self, available: Sequence[str], source: str) -> None:
        """Check that another prompt dataset (``source``, e.g. ``--eval-data-path X``) has every extra column this
        function reads.

        Raises:
            RewardFunctionError: naming the missing columns and ``source``.
        """
        missing = [name for name in self.columns if name not in available]
        if missing:
            raise RewardFunctionError(
                f"--reward-function {self.spec} reads {', '.join(missing)}, which {source} does not provide (its "
                f"extra columns: {', '.join(available) or 'none'}; keep them at preprocessing with --extra-columns)")

    def probe(self) -> None:
        """Call the function on one made-up row, so a broken function fails before any model is built."""
        extras = {name: [""] for name in self.columns}
        self(["What is 1 + 1?"], ["2"], extras, where="at start-up (probe call with one made-up row)")

    def __call__(self, prompts: list[str], responses: list[str], extras: Optional[dict] = None,
                 where: str = "") -> torch.Tensor:
        """Scores ``[batch]`` float32 on the CPU.

        Raises:
            RewardFunctionError: the function raised, or returned a wrong type, count, or a non-finite value.
        """
        kwargs = {name: list(values) for name, values in (extras or {}).items() if name in self.columns}
        try:
            out = self.fn(prompts, responses, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's code: report it as their error, with its message
            raise RewardFunctionError(f"--reward-function {self.spec} raised {type(exc).__name__}: {exc} "
                                      f"{where}".rstrip()) from exc
        n = len(responses)
        if torch.is_tensor(out):
            out = out.detach().cpu().reshape(-1).tolist() if out.dim() == 1 else out
        elif hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise RewardFunctionError(f"--reward-function {self.spec} returned {type(out).__name__} {where}; it must "
                                      f"return one number per response ({n})")
        if len(out) != n:
            raise RewardFunctionError(f"--reward-function {self.spec} returned {len(out)} scores for {n} responses "
                                      f"{where}".rstrip())
        scores = []
        for row, value in enumerate(out):
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                    hasattr(value, "item") and isinstance(value.item(), (int, float))):
                raise RewardFunctionError(f"--reward-function {self.spec} returned {type(value).__name__} "
                                          f"{value!r} for row {row} {where}".rstrip())
            value = float(value)
            if not math.isfinite(value):
                raise RewardFunctionError(f"--reward-function {self.spec} returned {value} for row {row} "
                                          f"{where}".rstrip())
            scores.append(value)
        return torch.tensor(scores, dtype=torch.float32, device="cpu")


class PPOModels:
    """The model slots of PPO (see the module docstring).

    Args:
        ppo: PPO flags (checkpoints, MoE loss coefficient, critic LR).
        model_args, optim_args: how models are built and trained. seed: seeds fresh value heads.
        train_steps: optimiser steps of each trained model over the run (LR schedule length).
        eos_token_id, pad_token_id: from the prompt dataset's metadata (None: from the actor's config).

    Attributes:
        actor, reference: slots; critic: slot, or None for estimators without values (``PPOArgs.uses_critic``);
        reward: slot or None (reward function only).
        eos_ids: stop tokens (EOS and ``--stop-token-ids``). pad_id: fills responses after their end.
        vocab_size: the real vocabulary size. score_pooling: the reward model's (``last`` / ``response_mean``).

    Raises:
        ArgumentError: a checkpoint of the wrong kind, differing vocabularies, no EOS id anywhere.
        CheckpointError: unreadable or mismatched checkpoints.
    """

    def __init__(self, ppo: PPOArgs, model_args: ModelArgs, optim_args: OptimizerArgs, *, seed: int,
                 train_steps: int, eos_token_id=None, pad_token_id: Optional[int] = None):
        actor_meta = read_checkpoint_meta(ppo.ref_model)
        if actor_meta.get("model_kind") != "causal_lm":
            raise ArgumentError(f"--ref-model {ppo.ref_model} is a {actor_meta.get('model_kind')} checkpoint; "
                                "the actor needs a causal LM")
        self.vocab_size = actor_meta["hf_config"]["vocab_size"]
        self.eos_ids, self.pad_id = self._special_tokens(actor_meta["hf_config"], eos_token_id, pad_token_id,
                                                         ppo.stop_token_ids)
        reward_meta = critic_meta = None
        self.score_pooling = "last"
        if ppo.reward_model:
            reward_meta = read_checkpoint_meta(ppo.reward_model)
            if reward_meta.get("model_kind") != "value":
                raise ArgumentError(f"--reward-model {ppo.reward_model} is a {reward_meta.get('model_kind')} "
                                    "checkpoint; it needs a value head (convert_ckpt.py --model-kind value)")
            self._check_vocab("--reward-model", reward_meta)
            try:
                self.score_pooling = checkpoint_score_pooling(reward_meta)
            except ValueError as exc:
                raise ArgumentError(f"--reward-model {ppo.reward_model}: {exc}") from None
        critic_path = (ppo.critic_model or ppo.reward_model or ppo.ref_model) if ppo.uses_critic else None
        if critic_path:
            critic_meta = read_checkpoint_meta(critic_path)
            self._check_vocab("--critic-model", critic_meta)

        moe = {}
        hf = actor_meta["hf_config"]
        if ppo.moe_aux_loss_coeff is not None and hf.get("num_local_experts", hf.get("num_experts")):
            moe["moe_aux_loss_coeff"] = ppo.moe_aux_loss_coeff
        self.actor = build_model_slot("actor", ppo.ref_model, "causal_lm", model_args, seed=seed, meta=actor_meta,
                                      optim_args=optim_args, train_steps=train_steps, **moe)
        self.reference = build_model_slot("reference", ppo.ref_model, "causal_lm", model_args, seed=seed,
                                          meta=actor_meta, **moe)
        self.reward = (build_model_slot("reward", ppo.reward_model, "value", model_args, seed=seed,
                                        meta=reward_meta) if ppo.reward_model else None)
        self.critic = (build_model_slot("critic", critic_path, "value", model_args, seed=seed, meta=critic_meta,
                                        optim_args=optim_args, train_steps=train_steps,
                                        lr=ppo.critic_lr if ppo.critic_lr is not None else optim_args.lr)
                       if critic_path else None)

    @staticmethod
    def _special_tokens(hf_config: dict, eos, pad, stop_token_ids: Sequence[int]) -> tuple[list[int], int]:
        if eos is None:
            eos = hf_config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos_ids = [int(e) for e in eos_ids] + [int(t) for t in stop_token_ids]
        if pad is None:
            pad = hf_config.get("pad_token_id")
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        if not eos_ids:
            raise ArgumentError("no EOS id in the dataset metadata or the actor's config: give --stop-token-ids")
        return eos_ids, int(pad)

    def _check_vocab(self, flag: str, meta: dict) -> None:
        vocab = meta.get("hf_config", {}).get("vocab_size")
        if vocab != self.vocab_size:
            raise ArgumentError(f"{flag}: vocabulary size {vocab} differs from the actor's {self.vocab_size} "
                                "(the models must share one tokenizer)")

    @property
    def trained(self) -> list[ModelSlot]:
        """The slots with optimisers (actor, and the critic when there is one), in checkpoint order."""
        return [self.actor] + ([self.critic] if self.critic is not None else [])
