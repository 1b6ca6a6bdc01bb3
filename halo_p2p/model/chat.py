"""Chat templates: turn a list of messages into the prompt text a chat model was trained on.

A template is the Jinja2 source in a GGUF's ``tokenizer.chat_template``. It is rendered the
way Hugging Face ``transformers`` renders chat templates (``apply_chat_template``): in an
``ImmutableSandboxedEnvironment`` with ``trim_blocks=True, lstrip_blocks=True``, the
``loopcontrols`` extension, a ``tojson`` filter, the ``raise_exception`` and ``strftime_now``
globals, and the variables ``messages`` (a list of ``{"role", "content"}`` dicts),
``add_generation_prompt``, ``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from halo_p2p.errors import ConfigError, ModelFormatError

__all__ = ["CHATML_MARKERS", "ChatTemplate", "Message", "require_template"]

log = logging.getLogger(__name__)

CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
"""Special tokens whose presence in a vocabulary marks a ChatML model."""

_CHATML_SOURCE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system_prompt %}"
    "{{ '<|im_start|>system\n' + default_system_prompt + '<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn.

    Attributes:
        role: ``"system"``, ``"user"`` or ``"assistant"`` (templates may accept others).
        content: the turn's text.
    """

    role: str
    content: str


class _TemplateRaised(Exception):
    """Raised by the template's own ``raise_exception`` (a message the template rejects)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template (transformers ``apply_chat_template`` semantics).

    Args:
        source: Jinja2 template text, e.g. the GGUF's ``tokenizer.chat_template``.
        bos_token: text of the model's BOS token, exposed to the template as ``bos_token``.
        eos_token: text of the model's EOS token, exposed as ``eos_token``.
        variables: extra template variables (the built-in ChatML template uses
            ``default_system_prompt``).

    Raises:
        ModelFormatError: ``source`` is not valid Jinja2.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 variables: dict[str, Any] | None = None) -> None:
        self.source = source
        self._context = {"bos_token": bos_token, "eos_token": eos_token, **(variables or {})}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ModelFormatError(
                f"the model's chat template has a syntax error at line {e.lineno}: {e.message}",
                "drop --chat and write the prompt by hand, or fix tokenizer.chat_template in "
                "the model file") from None

    @classmethod
    def chatml(cls, default_system_prompt: str | None = None) -> ChatTemplate:
        """The built-in ChatML template, for ChatML models whose metadata has no template.

        Renders ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
        ``<|im_start|>assistant\\n`` when a generation prompt is asked for.

        Args:
            default_system_prompt: system turn to insert when the conversation does not start
                with one; ``None`` inserts none.

        Returns:
            The template.
        """
        return cls(_CHATML_SOURCE, bos_token="<|im_start|>", eos_token="<|im_end|>",
                   variables={"default_system_prompt": default_system_prompt})

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation into prompt text.

        Args:
            messages: the turns so far, oldest first.
            add_generation_prompt: end with the header of an assistant turn, so that the
                model's continuation is the assistant's reply.

        Returns:
            The prompt text, with special-token markup (e.g. ``<|im_start|>``) that the
            tokenizer turns into special ids.

        Raises:
            ConfigError: the template rejects the conversation (its ``raise_exception``, e.g.
                roles that do not alternate).
            ModelFormatError: the template fails for another reason (a broken template).
        """
        context = {
            **self._context,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(context)
        except _TemplateRaised as e:
            raise ConfigError(f"the model's chat template rejects the conversation: {e}",
                              "change the messages to the form the template expects") from None
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ModelFormatError(f"the model's chat template failed: {e}",
                                   "drop --chat and write the prompt by hand") from None


def require_template(template: ChatTemplate | None, model_name: str, *,
                     special_tokens: Collection[str] = ()) -> ChatTemplate:
    """The chat template to use for ``--chat`` with a model, or a clear error.

    Args:
        template: the model's template, or ``None`` when the model's metadata has none.
        model_name: the model's name, for the error message.
        special_tokens: the model's special-token texts; when ``template`` is ``None`` and
            they hold both :data:`CHATML_MARKERS`, the built-in ChatML template is used.

    Returns:
        The template.

    Raises:
        ConfigError: the model has no template and is not a ChatML model.
    """
    if template is not None:
        return template
    if all(marker in special_tokens for marker in CHATML_MARKERS):
        log.info("model %r has no chat template; using the built-in ChatML one", model_name)
        return ChatTemplate.chatml()
    raise ConfigError(f"model {model_name!r} has no chat template",
                      "drop --chat, or use a chat model such as smollm2-135m-instruct")
