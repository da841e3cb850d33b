"""Only artifacts that load get into the store: `store add` and `store verify` prove it, not only that
a checksum matches.

A checksum says the bytes are the ones the card names; it does not say they are a prompt. A file
whose card was written over damaged tensors (a header claiming [30, 2, 3, 8, 64] float32 over half
the bytes, a card naming shapes the tensors do not have, a geometry no model has) used to be
accepted and then refused at serving time, with a message blaming the base model. `check_loads`
parses the safetensors header itself (nothing is allocated from it before its sizes are checked) and
refuses, naming the file and the fault:

- the header: every tensor's dtype is known, its byte range lies inside the data, holds exactly
  prod(shape) x itemsize bytes, and the ranges tile the data section with no gap or overlap;
- the card: its `tensors` list names exactly these tensors with these shapes and dtypes, and its
  `bytes` is the data section's length (its size and field bounds: io/card_schema.py);
- the geometry: the shapes are what the card's method and `num_virtual_tokens` need on the base
  geometry the card records, and, given the base model itself with the card's fingerprint, on that
  model's geometry.
"""

from __future__ import annotations

import json
import math
import struct

from softprompt.io.artifact import ArtifactError

MAX_HEADER_BYTES = 1 << 20  # the safetensors header of a prompt (a few tensors, the card) is far smaller
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def header_tensors(blob: bytes, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of a safetensors blob, once every tensor's bytes agree with
    its header; ArtifactError naming `where` and the fault otherwise."""
    if len(blob) < 8:
        raise ArtifactError(f"{where}: the file is truncated (shorter than a safetensors header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(blob):
        raise ArtifactError(f"{where}: the safetensors header claims {n} bytes, "
                            f"{'over the limit' if n > MAX_HEADER_BYTES else 'past the end of the file'}; "
                            "the file is truncated or not an artifact")
    try:
        header = json.loads(blob[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise ArtifactError(f"{where}: the safetensors header is not valid JSON; the file is damaged") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: the safetensors header is not an object; the file is damaged")
    data_len = len(blob) - 8 - n
    out, spans = {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("data_offsets"), list)
                and len(t["data_offsets"]) == 2 and all(_nonneg_int(x) for x in [*t["shape"], *t["data_offsets"]])):
            raise ArtifactError(f"{where}: tensor {name!r} has a malformed header entry (needs dtype, a shape of "
                                "non-negative integers and two data offsets)")
        dtype, shape, (begin, end) = t.get("dtype"), tuple(t["shape"]), t["data_offsets"]
        if dtype not in ITEMSIZE:
            raise ArtifactError(f"{where}: tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
        want = math.prod(shape) * ITEMSIZE[dtype]
        if end < begin or end > data_len:
            raise ArtifactError(f"{where}: tensor {name!r} lies at bytes {begin}..{end}, outside the data section of "
                                f"{data_len} bytes; the file is truncated or damaged")
        if end - begin != want:
            raise ArtifactError(f"{where}: tensor {name!r} holds {end - begin} bytes, but its header says {dtype} "
                                f"{list(shape)} = {want} bytes; the file is damaged")
        spans.append((begin, end, name))
        out[name] = (dtype, shape)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ArtifactError(f"{where}: tensor {name!r} starts at byte {begin}, but the previous one ends at "
                                f"{pos} (a gap or an overlap); the file is damaged")
        pos = end
    if pos != data_len:
        raise ArtifactError(f"{where}: the tensors cover {pos} of the {data_len} data bytes; the file is damaged")
    return out


def card_in(blob: bytes, where: str) -> dict:
    """The card a single-file artifact's header carries (unchecked), or ArtifactError naming `where`."""
    from softprompt.io.artifact import META_KEY

    try:
        (n,) = struct.unpack("<Q", blob[:8])
        if n > MAX_HEADER_BYTES:
            raise ValueError("header over the limit")
        card = json.loads(json.loads(blob[8:8 + n])["__metadata__"][META_KEY])
    except Exception as e:  # noqa: BLE001  any way of not being an artifact is the same answer
        raise ArtifactError(f"{where} is not a softprompt artifact file (no readable card in its safetensors header: "
                            f"{type(e).__name__}); it is truncated or another kind of file") from None
    if not isinstance(card, dict):
        raise ArtifactError(f"{where}: the card is not an object; the file is damaged")
    return card


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def card_geometry(card: dict):
    """The base geometry a card records, as its family's geometry class (softprompt/families);
    None if it records none, or none its family can read."""
    from softprompt.families import FAMILIES, card_family, family_named

    geo = (card.get("base_model") or {}).get("geometry")
    if not isinstance(geo, dict) or card_family(card) not in FAMILIES:
        return None
    return family_named(card_family(card)).card_geometry(geo)


def expected_shapes(card: dict, geo) -> dict | None:
    """name -> shape the card's method needs on `geo`; None where the card's family or method has no
    such rule (a classifier head, an unknown family)."""
    from softprompt.families import FAMILIES, card_family, family_named

    if card_family(card) not in FAMILIES or card.get("classifier"):
        return None
    fam = family_named(card_family(card))
    try:
        cls = fam.methods().get(card.get("method"))
    except ValueError:  # a family with no prompt methods
        return None
    if cls is None:
        return None
    try:
        shapes = cls.expected_shapes(geo, int(card["num_virtual_tokens"]), **fam.shape_options(card))
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return {k: tuple(v) for k, v in shapes.items()}


def check_loads(card: dict, blob: bytes, where: str, model=None) -> None:
    """Raise ArtifactError (one line: `where` and the fault) unless the artifact `blob` with `card`
    loads: see the module doc. `model`: a base model; checked against when it is the card's base."""
    from softprompt.core.geometry import model_fingerprint
    from softprompt.io.artifact import data_section

    have = header_tensors(blob, where)
    listed = card.get("tensors")
    if isinstance(listed, dict):
        named = {k: (v.get("dtype"), tuple(v.get("shape") or ())) for k, v in listed.items()}
        actual = {k: (TORCH_NAME.get(d, d), s) for k, (d, s) in have.items()}
        if named != actual:
            raise ArtifactError(f"{where}: the card lists tensors {_brief(named)}, but the file holds "
                                f"{_brief(actual)}; "
                                "the card does not describe these tensors")
    if card.get("bytes") is not None and card["bytes"] != len(data_section(blob)):
        raise ArtifactError(f"{where}: the card says {card['bytes']} tensor bytes, the file holds "
                            f"{len(data_section(blob))}; the file is truncated or altered")
    shapes = {k: s for k, (_, s) in have.items()}
    geo = card_geometry(card)
    if geo is not None:
        want = expected_shapes(card, geo)
        if want is not None and want != shapes:
            raise ArtifactError(f"{where}: tensor shapes {_brief(shapes)} are not what method {card.get('method')!r} "
                                f"with {card.get('num_virtual_tokens')} virtual tokens needs on the base geometry its "
                                f"card records ({_brief(want)}); the artifact is damaged")
    base = card.get("base_model") or {}
    if model is not None and base.get("fingerprint") == model_fingerprint(model):
        from softprompt.families import family_of

        fam = family_of(model)
        model_geo = fam.geometry(model)
        if geo is not None and geo != model_geo:
            raise ArtifactError(f"{where}: the card records base geometry {geo.to_dict()}, but its base model (same "
                                f"fingerprint) has {model_geo.to_dict()}; the card is damaged")
        want = expected_shapes(card, model_geo)
        if want is not None and want != shapes:
            raise ArtifactError(f"{where}: tensor shapes {_brief(shapes)} do not fit its base model, which needs "
                                f"{_brief(want)}")


def _brief(d: dict) -> str:
    def one(v):  # (dtype, shape) or a shape
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (str, type(None))):
            return f"{v[0]} {list(v[1])}"
        return str(list(v))

    text = ", ".join(f"{k}: {one(v)}" for k, v in sorted(d.items()))
    return "{" + (text if len(text) <= 200 else text[:197] + "...") + "}"
