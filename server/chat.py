"""Chat templates: a checkpoint's `config.json` may carry `chat_template`, a Jinja template (the
convention of Hugging Face tokenizers: it sees `messages`, a list of {role, content} with `name` where a
message has one, and `add_generation_prompt`; `tools` and `documents` are None, as transformers passes
them when there are none: this server has neither), and `chat_stop`, the stop sequences that end the
assistant's turn.

Templates are rendered in Jinja's immutable sandbox (as Hugging Face transformers does), so a
checkpoint's template can read the messages and nothing else, with transformers' whitespace options
(trim_blocks and lstrip_blocks; a newline that ends the source is not written: Jinja's default, which
transformers keeps). The sandbox holds what transformers gives a template (`_compile_jinja_template`):
`raise_exception(message)`, with which a template refuses a conversation (our 400 then carries its
message), the loop controls `{% break %}` and `{% continue %}`,
`{% generation %}…{% endgeneration %}` (transformers marks the assistant's tokens for training with it;
rendered as its body), and a `tojson` filter that writes JSON as `json.dumps` does (Jinja's own escapes
<, >, &, ' and every non-ASCII character, and sorts keys: another prompt than the one the template's
model was trained on).
`strftime_now` is left out: a prompt that held the date would make a seed's tokens depend on the day.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A checkpoint's chat template is not a valid Jinja template (the model is then not served)."""


def _raise_exception(message: str):
    """A template's refusal of the messages (transformers' `raise_exception`)."""
    raise TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: `json.dumps`, non-ASCII text kept, nothing HTML-escaped."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class GenerationBlock(Extension):
    """transformers' `{% generation %}…{% endgeneration %}`, which marks the assistant's part of a rendered
    conversation for a training mask: here its body, rendered as if the tags were not there."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)  # the tag's name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _default_template(source) -> str:
    """`chat_template`'s Jinja source: the string itself, or the template named "default" of the list of
    {"name", "template"} or the mapping Hugging Face writes when a model has several (ChatTemplateError
    naming what is wrong otherwise)."""
    if isinstance(source, str):
        return source
    if isinstance(source, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in source):
            raise ChatTemplateError('chat_template: a list must hold {"name", "template"} objects')
        source = {t["name"]: t.get("template") for t in source}
    if not isinstance(source, dict):
        raise ChatTemplateError("chat_template must be a string (a Jinja template), or Hugging Face's list "
                                'of {"name", "template"}')  # fmt: skip
    if "default" not in source:
        names = ", ".join(repr(n) for n in list(source)[:8])
        raise ChatTemplateError(f"chat_template: none of its templates ({names}) is named 'default', the one "
                                "served (the others are for tools or documents, which this server does not "
                                "take)")  # fmt: skip
    if not isinstance(source["default"], str):
        raise ChatTemplateError("chat_template: its 'default' template must be a string (a Jinja template)")
    return source["default"]


@dataclass
class ChatTemplate:
    source: str
    stop: list[str]

    def __post_init__(self) -> None:
        # (as transformers: keep_trailing_newline off, so a source's final newline is not written)
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlock]
        )
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat_template: {exc}") from None

    @classmethod
    def from_config(cls, meta: dict) -> ChatTemplate | None:
        """The template of a checkpoint's config.json metadata, None if it has none; ChatTemplateError
        when `chat_template` is not a template or `chat_stop` not a list of non-empty strings.
        `chat_template` is a string, or, as a Hugging Face tokenizer_config.json holds several, a list of
        {"name", "template"} (or a name → template mapping), of which the one named "default" is used, as
        transformers uses it for a conversation without tools (the others, "tool_use" and "rag", are for
        requests with tools or documents, which this server does not take)."""
        source = meta.get("chat_template")
        if source is None:
            return None
        stop = meta.get("chat_stop", [])
        source = _default_template(source)
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ChatTemplateError("chat_stop must be a list of non-empty strings")
        return cls(source, stop)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({role, content} dicts, content a string, and `name` where the
        message has one: a key left out, as Hugging Face passes a message, so that `m.name is defined`
        says whether it was sent). Raises ValueError (with Jinja's message) when the template fails on
        these messages: a TemplateError (an undefined name, `raise_exception`), or any error of Python's
        its expressions raise on them (`content + 1`, `tojson` of an undefined field: a TypeError, which
        was a 500)."""
        try:
            # (transformers' `render_jinja_template` always sets tools and documents: a template may test
            # `tools is not none`, which an undefined name passes)
            return self._template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template failed on these messages: {exc}") from None
        except Exception as exc:  # (the sandbox runs the template's Python: what it raises is its failure)
            why = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"the chat template failed on these messages: {why}") from None
