"""The one exception type the library raises for bad input: a message that says what to do.

`shorten(value)` is how a message quotes a value the user gave: a bounded repr (reprlib: the work
is bounded too, so a value built from YAML aliases with millions of elements costs nothing to
quote), cut to `limit` characters with the full length said."""

from __future__ import annotations

import reprlib

LIMIT = 120
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = LIMIT, LIMIT, 40


class AdapterError(ValueError):
    """Bad input to vlm_adapters (a config, a model, a prompt, a saved directory)."""


class ImageTooLarge(AdapterError):
    """An image above the pixel limit (or too thin): a refusal by policy, not a damaged file."""


def shorten(value, limit: int = LIMIT) -> str:
    """repr(value) for a message, at most `limit` characters (plus a note of what was cut)."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value):,} characters)"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
