"""Offer content as sandboxed Jinja2 templates over the profile (and the firing event).

Templates are compiled when an offer is saved, so a syntax error is a 422 then, never a
failure at decision time. Rendering runs in a sandbox (no attribute access to internals,
no imports); an undefined value renders as empty text.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jinja2 import ChainableUndefined, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

_ENV = SandboxedEnvironment(autoescape=False, trim_blocks=True, undefined=ChainableUndefined)


class TemplateError(ValueError):
    def __init__(self, loc: list[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def check(content: dict[str, Any]) -> None:
    """Compile every template of an offer's content; raises TemplateError naming the field."""
    for channel, fields in content.items():
        for name, text in (fields or {}).items():
            if not isinstance(text, str):
                continue
            try:
                _compiled(text)
            except TemplateSyntaxError as exc:
                raise TemplateError(
                    ["content", channel, name], f"template error: {exc.message}"
                ) from exc


@lru_cache(maxsize=4096)
def _compiled(text: str) -> Any:
    return _ENV.from_string(text)


def render(
    content: Mapping[str, Any],
    channel: str,
    profile: Mapping[str, Any],
    event: Mapping[str, Any] | None,
) -> dict[str, str]:
    """The content for one channel (its own, else the default) rendered for one customer."""
    fields = content.get(channel) or content.get("default") or {}
    ctx = {**profile, "profile": profile, "event": event or {}}
    return {k: _compiled(v).render(ctx) for k, v in fields.items() if isinstance(v, str)}
