"""Chat templates: a checkpoint's `config.json` may carry `chat_template`, a Jinja template (the
convention of Hugging Face tokenizers: it sees `messages`, a list of {role, content, name}, and
`add_generation_prompt`), and `chat_stop`, the stop sequences that end the assistant's turn.

Templates are rendered in Jinja's immutable sandbox (as Hugging Face transformers does), so a
checkpoint's template can read the messages and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A checkpoint's chat template is not a valid Jinja template (the model is then not served)."""


@dataclass
class ChatTemplate:
    source: str
    stop: list[str]

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat_template: {exc}") from None

    @classmethod
    def from_config(cls, meta: dict) -> ChatTemplate | None:
        """The template of a checkpoint's config.json metadata, None if it has none; ChatTemplateError
        when `chat_template` is not a string or `chat_stop` not a list of non-empty strings."""
        source = meta.get("chat_template")
        if source is None:
            return None
        stop = meta.get("chat_stop", [])
        if not isinstance(source, str):
            raise ChatTemplateError("chat_template must be a string (a Jinja template)")
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ChatTemplateError("chat_stop must be a list of non-empty strings")
        return cls(source, stop)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({role, content, name} dicts, content a string). Raises
        ValueError (with Jinja's message) when the template fails on these messages."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise ValueError(f"the chat template failed on these messages: {exc}") from None
