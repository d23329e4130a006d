"""Chat templates: the model's Jinja template rendered in a sandbox, as transformers does.

The environment matches transformers' ``apply_chat_template``: ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter
that keeps non-ASCII text, and the globals ``raise_exception`` and ``strftime_now``; the
``{% generation %}`` block (used by some templates to mark assistant text) renders its body.
A template may not touch Python internals (``''.__class__`` and friends): the sandbox refuses,
and every failure, from a syntax error to ``raise_exception``, becomes one ``TokenizerError``.

A model without a template gets ChatML, which is also what llama.cpp falls back to.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers tracks assistant spans with it;
    here it only renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(
            f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise TokenizerError(f"chat message {index} must be a dict with a 'role', got {message!r}")


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render ``messages`` with ``template`` (ChatML when None); extra variables such as
    ``bos_token``/``eos_token`` are passed to the template."""
    _check_messages(messages)
    source = CHATML_TEMPLATE if template is None else template
    try:
        compiled = _compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from exc
    try:
        return compiled.render(
            messages=[dict(message) for message in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.SecurityError as exc:
        raise TokenizerError(f"chat template was refused by the sandbox: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"chat template failed: {exc}") from exc
    except Exception as exc:  # a template is a program: any error inside it is the template's
        raise TokenizerError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
