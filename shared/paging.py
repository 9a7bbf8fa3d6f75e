"""Opaque cursors for paged lists (``?cursor=&limit=``)."""

from __future__ import annotations

import base64

from shared.errors import Unprocessable


def encode_cursor(key: str | int) -> str:
    """An opaque cursor for a keyset position (an id, or an offset)."""
    return base64.urlsafe_b64encode(str(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, name: str = "cursor") -> str:
    """The position a cursor names ("" for none); 422 for one this API did not return."""
    if not cursor:
        return ""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unprocessable(
            f"{name}: not a cursor this API returned",
            errors=[{"loc": ["query", name], "msg": "not a cursor this API returned"}],
        ) from exc
