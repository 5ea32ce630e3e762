"""Tokenizers for offline preprocessing, behind one small interface.

Two kinds, named as on the command line (``--tokenizer-type``):

* ``PretrainedFromHF``: a Hugging Face tokenizer loaded with ``transformers.AutoTokenizer`` from
  ``--tokenizer-name-or-path`` (a local directory or a Hub name). Special-token strings written in the text (such as
  ``<|im_start|>``) are recognised and encoded as their single ids, exactly as ``tokenizer(text,
  add_special_tokens=False)`` does.
* ``SentencePieceTokenizer``: a raw ``sentencepiece`` model file (``--tokenizer-model``). SentencePiece does not
  recognise control pieces (``<s>``, ``</s>``) written in text, so the text is split around them: each control piece
  becomes its id and each piece of text between them is encoded on its own.

In both cases :meth:`TextTokenizer.encode_batch` never adds BOS/EOS by itself: every special token of a prompt comes
from the template's text (see :mod:`posttrain.data.templates`).
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Sequence

from posttrain.data.errors import DataError

TOKENIZER_TYPES = ("PretrainedFromHF", "SentencePieceTokenizer")


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a tokenizer comes from; small and picklable, so each worker process can load its own copy.

    Attributes:
        tokenizer_type: ``"PretrainedFromHF"`` or ``"SentencePieceTokenizer"``.
        name_or_path: Hugging Face directory or Hub name (``PretrainedFromHF``).
        model: path of the ``.model`` file (``SentencePieceTokenizer``).
    """

    tokenizer_type: str
    name_or_path: str | None = None
    model: str | None = None

    def load(self) -> "TextTokenizer":
        """Load the tokenizer.

        Returns:
            The loaded :class:`TextTokenizer`.

        Raises:
            DataError: unknown type, missing path, or a path that does not hold a loadable tokenizer.
        """
        if self.tokenizer_type == "PretrainedFromHF":
            if not self.name_or_path:
                raise DataError("--tokenizer-type PretrainedFromHF needs --tokenizer-name-or-path")
            return HFTokenizer(self.name_or_path)
        if self.tokenizer_type == "SentencePieceTokenizer":
            if not self.model:
                raise DataError("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
            return SentencePieceTextTokenizer(self.model)
        raise DataError(f"--tokenizer-type {self.tokenizer_type!r} is unknown; valid types: "
                        + ", ".join(TOKENIZER_TYPES))

    def describe(self) -> str:
        """The path the tokenizer is loaded from (for logs and the metadata file)."""
        return str(self.name_or_path if self.tokenizer_type == "PretrainedFromHF" else self.model)


class TextTokenizer(ABC):
    """The tokenizer interface the preprocessing pipeline uses.

    Attributes:
        vocab_size: number of token ids, added tokens included; every id is in ``[0, vocab_size)``.
        eos_token_id: end-of-sequence id, or None.
        bos_token_id: beginning-of-sequence id, or None.
        pad_token_id: padding id; the EOS id when the tokenizer defines no pad token (``pad_is_eos`` then True).
        eos_token: text of the EOS token ("" when none), as templates write it.
        bos_token: text of the BOS token ("" when none).
    """

    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None
    pad_is_eos: bool
    eos_token: str
    bos_token: str

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode texts without adding special tokens of its own.

        Args:
            texts: ``n`` strings; special-token strings inside them are encoded as their ids.

        Returns:
            ``n`` lists of token ids, one per text, in order.
        """

    def encode(self, text: str) -> list[int]:
        """Encode one text (see :meth:`encode_batch`)."""
        return self.encode_batch([text])[0]

    def single_token_id(self, text: str) -> int | None:
        """The id of ``text`` when the tokenizer encodes it as exactly one token, else None."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Render ``messages`` with the tokenizer's own chat template, ending with the assistant's header.

        Raises:
            DataError: the tokenizer has no chat template.
        """
        raise DataError(f"{type(self).__name__} has no chat template; --prompt-type hf needs a Hugging Face "
                        "tokenizer with one (--tokenizer-type PretrainedFromHF)")

    def describe_ids(self) -> dict:
        """The special ids and vocabulary size, for the metadata file."""
        return {"vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
                "pad_is_eos": self.pad_is_eos}


def _looks_local(name_or_path: str) -> bool:
    """True when ``name_or_path`` can only mean a local path (Hub names are ``name`` or ``org/name``)."""
    return (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
            or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path)


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer (``AutoTokenizer.from_pretrained``).

    Args:
        name_or_path: local directory or Hub name.

    Raises:
        DataError: the path does not exist or holds no loadable tokenizer.
    """

    def __init__(self, name_or_path: str) -> None:
        if _looks_local(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
            raise DataError(f"--tokenizer-name-or-path {name_or_path}: no such file or directory")
        try:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for unloadable paths
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise DataError(f"--tokenizer-name-or-path {name_or_path}: cannot load a tokenizer "
                            f"({type(exc).__name__}: {first_line})") from None
        hf = self.hf
        self.vocab_size = len(hf)
        self.eos_token_id = hf.eos_token_id
        self.bos_token_id = hf.bos_token_id
        self.pad_is_eos = hf.pad_token_id is None
        self.pad_token_id = hf.eos_token_id if self.pad_is_eos else hf.pad_token_id
        self.eos_token = hf.eos_token or ""
        self.bos_token = hf.bos_token or ""
        # The backend's batch encoder is what ``hf(texts, add_special_tokens=False)`` calls, minus the Python-side
        # BatchEncoding assembly; only used when the wrapper would not alter the call (split_special_tokens off).
        self._backend = (hf.backend_tokenizer if getattr(hf, "is_fast", False)
                         and not getattr(hf, "split_special_tokens", False) else None)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            return [enc.ids for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return list(self.hf(list(texts), add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        # Single-text path: never starts the backend's thread pool (keeps a later fork of worker processes clean).
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise DataError("--prompt-type hf: the tokenizer has no chat template; choose another --prompt-type")
        return self.hf.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                           tokenize=False)

    def render_conversation(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Render a whole conversation (no generation prompt) with the chat template."""
        return self.hf.apply_chat_template([dict(m) for m in messages], add_generation_prompt=False,
                                           tokenize=False)


class SentencePieceTextTokenizer(TextTokenizer):
    """A raw SentencePiece model (``sentencepiece.SentencePieceProcessor``).

    Control pieces (``<s>``, ``</s>`` and any other control piece of the model) written in the text are mapped to
    their ids; the text between them is encoded piece by piece (SentencePiece adds its word-start marker at the
    start of each such piece, as the slow Llama tokenizer does).

    Args:
        model_path: path of the ``.model`` file.

    Raises:
        DataError: the file does not exist or is not a SentencePiece model.
    """

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise DataError(f"--tokenizer-model {model_path}: no such file")
        try:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise DataError(f"--tokenizer-model {model_path}: cannot load a SentencePiece model "
                            f"({type(exc).__name__}: {first_line})") from None
        sp = self.sp
        self.vocab_size = sp.get_piece_size()

        def _id(value: int) -> int | None:
            return None if value < 0 else value

        self.eos_token_id = _id(sp.eos_id())
        self.bos_token_id = _id(sp.bos_id())
        pad = _id(sp.pad_id())
        self.pad_is_eos = pad is None
        self.pad_token_id = self.eos_token_id if pad is None else pad
        self.eos_token = sp.id_to_piece(self.eos_token_id) if self.eos_token_id is not None else ""
        self.bos_token = sp.id_to_piece(self.bos_token_id) if self.bos_token_id is not None else ""
        control = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self._control = control
        self._split = (re.compile("(" + "|".join(re.escape(p) for p in sorted(control, key=len, reverse=True))
                                  + ")") if control else None)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._split is None:
            return [list(ids) for ids in self.sp.encode(list(texts))]
        # One encode call for every text segment of every text, then reassemble in order.
        parts_per_text = [self._split.split(text) for text in texts]
        segments = [part for parts in parts_per_text for part in parts[0::2] if part]
        encoded = iter(self.sp.encode(segments)) if segments else iter(())
        out = []
        for parts in parts_per_text:
            ids: list[int] = []
            for k, part in enumerate(parts):
                if k % 2:
                    ids.append(self._control[part])
                elif part:
                    ids.extend(next(encoded))
            out.append(ids)
        return out
