"""The schema of an artifact's card, checked on every read (load, store add, serving).

A card is data from whoever made the file: `"num_virtual_tokens": "abc"` or `"config": "x"` used to
pass `store add` and then raise deep in a loader on the first request. `check_card_fields` refuses
such a card with one line naming the field. Unknown fields are allowed (families and tasks add
their own: `classifier`, `task`, `store`); known fields must have their type.

`prompt_format` says how training formatted the inputs (`chat_template`: wrapped in the base's chat
template as a user turn; `template`: the row-field template; `system_prompt`: the system turn every
chat row began with), so a server can give a request the text the task learned on
(serve/prompt_format.py). A card without it is from before it was recorded: its format is unknown.

Paths: a card may name a `plot` (.png) and an `inspection` (.json, or the summary inline). They are
never trusted as places to read: the server reads them only inside the store or the artifact's
folder (serve/http.py `confined`), and `store add` copies them into the store.
"""

from __future__ import annotations

import re
from pathlib import Path

from softprompt.families import FAMILIES

# Longer than any context we know of (P must also fit the model's context: see methods.check_size).
MAX_VIRTUAL_TOKENS = 1 << 20
MAX_PATH_CHARS = 4096
MAX_FORMAT_CHARS = 1 << 16  # a prompt_format's template or system prompt (a long system prompt fits)
# A card is metadata read on every load and shown whole by the API: its JSON has a bound, and so does
# each field, so a card can neither hold a data set nor make a server allocate one.
MAX_CARD_BYTES = 64 << 10
MAX_SHORT_CHARS = 1024  # names, versions, dates, a dtype, a fingerprint
MAX_ENTRIES = 1024  # keys of a metrics, tensors or config object; top-level fields
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CardError(ValueError):
    """A card field has the wrong type or value; the message names the field."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_or_none(v) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= MAX_SHORT_CHARS)


def _short(v) -> bool:
    return isinstance(v, str) and len(v) <= MAX_SHORT_CHARS


def _obj(v) -> bool:
    return isinstance(v, dict) and len(v) <= MAX_ENTRIES


def _path(v, suffix: str) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_PATH_CHARS and "\0" not in v and v.lower().endswith(suffix)


def _text(v) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= MAX_FORMAT_CHARS)


def _prompt_format(v) -> bool:
    """{"chat_template": bool, "template": str|None, "system_prompt": str|None}; a system prompt only
    with the chat template (a plain prompt has no system turn, so the server could not place one)."""
    return (isinstance(v, dict) and isinstance(v.get("chat_template"), bool) and _text(v.get("template"))
            and _text(v.get("system_prompt")) and (v["chat_template"] or v.get("system_prompt") is None))


# field -> (check, what it must be); each applies when the field is present
FIELDS = {
    "config": (_obj, f"an object of at most {MAX_ENTRIES} entries"),
    "tensors": (lambda v: _obj(v) and all(
        isinstance(t, dict) and isinstance(t.get("shape"), list) and all(_int(n) and n >= 0 for n in t["shape"])
        and isinstance(t.get("dtype"), str) for t in v.values()),
        "an object of {name: {shape: [non-negative ints], dtype: string}}"),
    "dtype": (_short, f"a string of at most {MAX_SHORT_CHARS} characters"),
    "model_family": (lambda v: isinstance(v, str) and v in FAMILIES, "one of " + ", ".join(repr(f) for f in FAMILIES)),
    "base_model": (lambda v: isinstance(v, dict) and _str_or_none(v.get("name"))
                   and _str_or_none(v.get("fingerprint")) and (v.get("geometry") is None or isinstance(v["geometry"], dict)),
                   f"an object with string name and fingerprint (at most {MAX_SHORT_CHARS} characters) and an object "
                   "geometry"),
    "library_version": (_str_or_none, f"a string of at most {MAX_SHORT_CHARS} characters"),
    "created": (_str_or_none, f"a string of at most {MAX_SHORT_CHARS} characters"),
    "metrics": (lambda v: v is None or (_obj(v) and all(isinstance(k, str) and len(k) <= MAX_SHORT_CHARS for k in v)),
                f"an object of at most {MAX_ENTRIES} {{name: value}}"),
    "dataset": (lambda v: v is None or (isinstance(v, str) and len(v) <= MAX_PATH_CHARS) or _obj(v),
                f"a string of at most {MAX_PATH_CHARS} characters or an object"),
    "tensor_sha256": (lambda v: isinstance(v, str) and bool(_HEX64.fullmatch(v)), "64 lowercase hex digits"),
    "bytes": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "plot": (lambda v: v is None or _path(v, ".png"), "a path ending in .png"),
    "inspection": (lambda v: v is None or isinstance(v, dict) or _path(v, ".json"),
                   "an object or a path ending in .json"),
    "classifier": (_obj, "an object"),
    "task": (_short, f"a string of at most {MAX_SHORT_CHARS} characters"),
    "store": (_obj, "an object"),
    "prompt_format": (lambda v: v is None or _prompt_format(v),
                      f"an object {{chat_template: bool, template: string or null, system_prompt: string or null "
                      f"(only with chat_template true)}}, strings of at most {MAX_FORMAT_CHARS} characters"),
}


def check_card_fields(card: dict) -> None:
    """Raise CardError (one line, naming the field) unless every known field has its type.
    format, format_version and method are checked by the caller (artifact.check_card). The card as a
    whole is at most MAX_CARD_BYTES of JSON and MAX_ENTRIES fields."""
    import json

    if len(card) > MAX_ENTRIES:
        raise CardError(f"the card has {len(card)} fields, over the limit of {MAX_ENTRIES}")
    n = card.get("num_virtual_tokens")
    lowest = 0 if card.get("task") == "classify" else 1  # a classifier may be its head alone, with no prompt
    if not _int(n) or not lowest <= n <= MAX_VIRTUAL_TOKENS:
        raise CardError(f"card field 'num_virtual_tokens' must be an integer in [{lowest}, {MAX_VIRTUAL_TOKENS}], "
                        f"got {_show(n)}")
    for field, (ok, what) in FIELDS.items():
        if field in card and not ok(card[field]):
            raise CardError(f"card field {field!r} must be {what}, got {_show(card[field])}")
    # then the whole (after the fields, so a field over its own bound is named as such)
    try:
        size = len(json.dumps(card, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        raise CardError("the card is not plain JSON data") from None
    if size > MAX_CARD_BYTES:
        raise CardError(f"the card is {size} bytes of JSON, over the limit of {MAX_CARD_BYTES}; keep large things "
                        "(data, plots, long summaries) in files beside the artifact")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def card_file_path(artifact, value) -> "Path | None":
    """The file a card's `plot`/`inspection` value names, if it is one the artifact may name: a file
    beside the artifact, never elsewhere (a card naming /root/x.json must not make anyone read it).

    An artifact F.safetensors or DIR may name files beside it whose name starts with `F.` or `DIR.`
    (what `softprompt inspect` writes); DIR also files inside DIR, and a training run's OUT/best or
    OUT/last also files inside OUT (where `softprompt train` draws plot.png).
    Relative values are relative to the artifact's folder. Symlinks are resolved before the check.
    """
    from pathlib import Path

    if not isinstance(value, str) or not value or "\0" in value:
        return None
    artifact = Path(artifact)
    try:
        real = (artifact.parent / value).resolve(strict=True)  # an absolute value stays itself
        folder, stem = artifact.parent.resolve(), artifact.name.removesuffix(".safetensors")
        ok = real.parent == folder and real.name.startswith(stem + ".")  # F.inspect.json, DIR.inspect.json
        if artifact.is_dir():
            ok = ok or real.is_relative_to(artifact.resolve()) or (
                artifact.name in ("best", "last") and real.is_relative_to(folder))
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop
        return None
    return real if ok and real.is_file() else None
