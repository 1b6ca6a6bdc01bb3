"""Chat templates: SmolLM2's real template from its GGUF, and the built-in ChatML fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from halo_p2p.errors import ConfigError, ModelFormatError
from halo_p2p.model.chat import ChatTemplate, Message, require_template

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
EXPECTED_ONE_TURN = (
    f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QUESTION = [Message("user", "What is the capital of France?")]


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path: Path) -> ChatTemplate:
    source = GGUFReader(smollm2_path).fields["tokenizer.chat_template"].contents()
    assert DEFAULT_SYSTEM in source
    return ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")


def test_smollm2_one_user_message(smollm2_template: ChatTemplate) -> None:
    assert smollm2_template.render(QUESTION) == EXPECTED_ONE_TURN
    assert smollm2_template.render(QUESTION, add_generation_prompt=False) == \
        EXPECTED_ONE_TURN.removesuffix("<|im_start|>assistant\n")


def test_smollm2_system_message_replaces_default(smollm2_template: ChatTemplate) -> None:
    text = smollm2_template.render([Message("system", "Be brief."), *QUESTION])
    assert DEFAULT_SYSTEM not in text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_smollm2_multi_turn(smollm2_template: ChatTemplate) -> None:
    history = [*QUESTION, Message("assistant", "Paris."), Message("user", "And Spain?")]
    assert smollm2_template.render(history) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd Spain?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_builtin_chatml_matches_smollm2(smollm2_template: ChatTemplate) -> None:
    chatml = ChatTemplate.chatml(DEFAULT_SYSTEM)
    history = [*QUESTION, Message("assistant", "Paris."), Message("user", "And Spain?")]
    for messages in (QUESTION, history, [Message("system", "Be brief."), *QUESTION]):
        assert chatml.render(messages) == smollm2_template.render(messages)


def test_builtin_chatml_without_default_system() -> None:
    assert ChatTemplate.chatml().render(QUESTION) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_transformers_environment() -> None:
    source = ("{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}"
              "{{ m.content | tojson }}{{ eos_token }}{% endif %}{% endfor %}")
    tpl = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert tpl.render([Message("user", "hé \"x\"")]) == '<s>"hé \\"x\\""</s>'
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one
    indented = ChatTemplate("  {% for m in messages %}\n{{ m.content }}\n  {% endfor %}\n")
    assert indented.render([Message("user", "a"), Message("user", "b")]) == "a\nb\n"


def test_raise_exception_is_a_config_error() -> None:
    tpl = ChatTemplate("{% if messages[0].role != 'user' %}"
                       "{{ raise_exception('first message must be from the user') }}{% endif %}")
    with pytest.raises(ConfigError, match="first message must be from the user"):
        tpl.render([Message("assistant", "hi")])


def test_syntax_error_is_a_format_error() -> None:
    with pytest.raises(ModelFormatError, match="syntax error") as e:
        ChatTemplate("{% for m in messages %}")
    assert e.value.fix


def test_sandbox_blocks_attribute_escape() -> None:
    tpl = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ModelFormatError):
        tpl.render(QUESTION)


def test_require_template() -> None:
    tpl = ChatTemplate.chatml()
    assert require_template(tpl, "x") is tpl
    fallback = require_template(None, "my-chatml", special_tokens={"<|im_start|>", "<|im_end|>"})
    assert fallback.render(QUESTION).startswith("<|im_start|>user\n")
    with pytest.raises(ConfigError) as e:
        require_template(None, "stories260K", special_tokens={"<unk>", "<s>", "</s>"})
    assert str(e.value) == ("model 'stories260K' has no chat template (drop --chat, or use a "
                            "chat model such as smollm2-135m-instruct)")
