"""Prompt templates (``--prompt-type``): how a conversation is written before the model's reply.

A template turns a conversation, given as messages ``{"role": "system" | "user" | "assistant", "content": str}``
(an optional system message first, then user and assistant turns alternating, ending with a user turn), into the
**text** that ends exactly where the assistant's reply begins. The tokenizer then encodes that text with
``add_special_tokens=False``.

Special tokens are written as text. A template writes its control tokens (``<|im_start|>``, ``<|eot_id|>``,
the tokenizer's BOS text for ``{bos}``, its EOS text for ``{eos}``) into the string, and the tokenizer recognises
them, so the stored ids equal ``tokenizer(templated_text, add_special_tokens=False)`` and nothing is added
behind the template's back. ``empty`` writes no special token at all: its ids are
``tokenizer(prompt, add_special_tokens=False)``. As with ``apply_chat_template``, control-token strings that occur
inside the data's own text are recognised too.

Registered templates (``{p}`` is the user's text; shown for one user turn, no system column):

* ``empty``: ``{p}``
* ``llama3``: ``{bos}<|start_header_id|>user<|end_header_id|>\\n\\n{p}<|eot_id|>``
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` (``{bos}`` is the tokenizer's BOS text)
* ``qwen``: ``<|im_start|>system\\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\\n<|im_start|>user\\n{p}<|im_end|>\\n``
  ``<|im_start|>assistant\\n``, where the default system prompt is Qwen2.5's "You are Qwen, created by Alibaba
  Cloud. You are a helpful assistant." (as in Qwen2.5's own chat template and LLaMA-Factory's ``qwen`` template;
  MindSpeed-LLM's template file and Qwen1.5/Qwen2 use "You are a helpful assistant.": pass it with
  ``--system-prompt`` to reproduce those)
* ``chatml``: ``<|im_start|>user\\n{p}<|im_end|>\\n<|im_start|>assistant\\n`` (no default system prompt)
* ``alpaca``: ``Below is an instruction that describes a task. Write a response that appropriately completes the
  request.\\n\\n### Instruction:\\n{p}\\n\\n### Response:\\n``
* ``hf``: the tokenizer's own chat template, ``apply_chat_template(messages, add_generation_prompt=True)``

Each template also has an *end of turn*: the text that closes an assistant reply (``<|im_end|>`` for qwen/chatml,
``<|eot_id|>`` for llama3, the tokenizer's EOS for empty/alpaca, the stripped text the chat template writes after
a reply for hf). Earlier assistant turns are written ``content + end_of_turn + separator``; a response to score
(preference pairs) is written ``content + end_of_turn``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Sequence

from posttrain.data.errors import DataError

Message = Mapping[str, str]

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_DEFAULT_SYSTEM = ("Below is an instruction that describes a task. "
                         "Write a response that appropriately completes the request.")


class BoundTemplate(ABC):
    """A template bound to one tokenizer (BOS/EOS texts resolved); what workers call for every row."""

    name: str

    @abstractmethod
    def render_prompt(self, messages: Sequence[Message]) -> str:
        """Write the conversation up to the start of the assistant's reply.

        Args:
            messages: an optional ``system`` message, then ``user``/``assistant`` messages alternating, ending with a
                ``user`` message.

        Returns:
            The templated text (special tokens written as text).
        """

    @property
    @abstractmethod
    def end_of_turn(self) -> str:
        """Text that closes an assistant reply (may be empty when the tokenizer has no EOS)."""

    @property
    def control_strings(self) -> tuple[str, ...]:
        """Special-token strings this template writes; each should be a single token of the tokenizer."""
        return ()


class ChatTemplate(ABC):
    """A registered prompt template (unbound)."""

    name: str
    description: str

    @abstractmethod
    def bind(self, tokenizer) -> BoundTemplate:
        """Resolve the template against ``tokenizer`` (a :class:`~posttrain.data.tokenizer.TextTokenizer`).

        Raises:
            DataError: the template cannot be used with this tokenizer.
        """


def _split_content(fmt: str) -> tuple[str, str]:
    """Split a format string at its single ``{content}`` slot."""
    head, sep, tail = fmt.partition("{content}")
    if not sep:
        raise ValueError(f"format {fmt!r} lacks a {{content}} slot")
    return head, tail


@dataclass(frozen=True)
class FormatTemplate(ChatTemplate):
    """A template written as format strings.

    ``{bos}`` and ``{eos}`` in any field are replaced by the tokenizer's BOS/EOS text; ``{content}`` is the slot for
    a message's text (inserted verbatim, never re-formatted).

    Attributes:
        name: the ``--prompt-type`` value.
        description: one line for ``--help``.
        prefix: written once at the very start.
        system: format of the system message.
        user: format of a user message, including the assistant header that follows it.
        end_of_turn: text that closes an assistant reply.
        separator: written after an earlier assistant turn, before the next user turn.
        default_system: system text used when the conversation has none (None: no system message).
        control: special-token strings the template writes (checked against the tokenizer's vocabulary).
    """

    name: str
    description: str
    user: str
    prefix: str = ""
    system: str = "{content}\n"
    end_of_turn: str = "{eos}"
    separator: str = ""
    default_system: str | None = None
    control: tuple[str, ...] = ()

    def bind(self, tokenizer) -> BoundTemplate:
        return _BoundFormat(self, tokenizer.bos_token or "", tokenizer.eos_token or "")


class _BoundFormat(BoundTemplate):
    def __init__(self, template: FormatTemplate, bos: str, eos: str) -> None:
        def res(text: str) -> str:
            return text.replace("{bos}", bos).replace("{eos}", eos)

        self.name = template.name
        self._prefix = res(template.prefix)
        self._system = _split_content(res(template.system))
        self._user = _split_content(res(template.user))
        self._eot = res(template.end_of_turn)
        self._sep = res(template.separator)
        self._default_system = template.default_system
        specials = list(template.control)
        if "{bos}" in template.prefix + template.system + template.user and bos:
            specials.append(bos)
        if "{eos}" in template.end_of_turn and eos:
            specials.append(eos)
        self._control = tuple(dict.fromkeys(specials))

    @property
    def end_of_turn(self) -> str:
        return self._eot

    @property
    def control_strings(self) -> tuple[str, ...]:
        return self._control

    def render_prompt(self, messages: Sequence[Message]) -> str:
        parts = [self._prefix]
        start = 0
        system = self._default_system
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"]
            start = 1
        if system:
            parts += (self._system[0], system, self._system[1])
        for message in messages[start:]:
            role = message["role"]
            if role == "user":
                parts += (self._user[0], message["content"], self._user[1])
            elif role == "assistant":
                parts += (message["content"], self._eot, self._sep)
            else:
                raise ValueError(f"template {self.name}: unexpected role {role!r} after the first message")
        return "".join(parts)


@dataclass(frozen=True)
class HFChatTemplate(ChatTemplate):
    """The tokenizer's own chat template (``apply_chat_template(..., add_generation_prompt=True)``)."""

    name: str = "hf"
    description: str = "the tokenizer's own chat template (apply_chat_template, add_generation_prompt=True)"

    def bind(self, tokenizer) -> BoundTemplate:
        if not hasattr(tokenizer, "render_conversation"):
            raise DataError("--prompt-type hf needs --tokenizer-type PretrainedFromHF (a tokenizer with a chat "
                            "template)")
        if not getattr(tokenizer.hf, "chat_template", None):
            raise DataError("--prompt-type hf: the tokenizer has no chat template; choose another --prompt-type")
        return _BoundHF(tokenizer)


class _BoundHF(BoundTemplate):
    _PROBE = "\x00posttrain-probe\x00"

    def __init__(self, tokenizer) -> None:
        self.name = "hf"
        self._tok = tokenizer
        # The end of turn is what the chat template writes right after an assistant reply, whitespace stripped
        # (e.g. "<|im_end|>" from "<|im_end|>\n"); the EOS text when it writes nothing there.
        rendered = tokenizer.render_conversation([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": self._PROBE}])
        after = rendered.rpartition(self._PROBE)[2] if self._PROBE in rendered else ""
        self._eot = after.strip() or tokenizer.eos_token or ""

    @property
    def end_of_turn(self) -> str:
        return self._eot

    def render_prompt(self, messages: Sequence[Message]) -> str:
        # An empty system message means "no system prompt": leave it out (the chat template's own default, if it
        # has one, then applies).
        if messages and messages[0]["role"] == "system" and not messages[0]["content"]:
            messages = messages[1:]
        return self._tok.apply_chat_template(messages)


_REGISTRY: dict[str, ChatTemplate] = {}


def register_template(template: ChatTemplate) -> ChatTemplate:
    """Add ``template`` to the registry under ``template.name`` (replacing one of the same name)."""
    _REGISTRY[template.name] = template
    return template


def get_template(name: str) -> ChatTemplate:
    """The registered template called ``name``.

    Raises:
        DataError: unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DataError(f"--prompt-type {name!r} is unknown; valid prompt types: "
                        + ", ".join(sorted(_REGISTRY))) from None


def template_names() -> list[str]:
    """Names of all registered templates, sorted."""
    return sorted(_REGISTRY)


_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"

register_template(FormatTemplate(
    name="empty", description="the raw prompt, no special tokens",
    user="{content}", system="{content}\n", end_of_turn="{eos}"))
register_template(FormatTemplate(
    name="llama3", description="Llama 3 header tokens, BOS first",
    prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>",
    control=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")))
register_template(FormatTemplate(
    name="qwen", description="ChatML with Qwen's default system prompt",
    system=_CHATML_SYSTEM, user=_CHATML_USER, end_of_turn="<|im_end|>", separator="\n",
    default_system=QWEN_DEFAULT_SYSTEM, control=("<|im_start|>", "<|im_end|>")))
register_template(FormatTemplate(
    name="chatml", description="ChatML, no default system prompt",
    system=_CHATML_SYSTEM, user=_CHATML_USER, end_of_turn="<|im_end|>", separator="\n",
    control=("<|im_start|>", "<|im_end|>")))
register_template(FormatTemplate(
    name="alpaca", description="Alpaca '### Instruction / ### Response' with its default preamble",
    system="{content}\n\n", user="### Instruction:\n{content}\n\n### Response:\n",
    end_of_turn="{eos}", separator="\n\n", default_system=ALPACA_DEFAULT_SYSTEM))
register_template(HFChatTemplate())
