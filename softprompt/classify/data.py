"""Classification data: rows with a text and a label, from the same files `softprompt train` reads.

A row is rendered with `template` over its fields (default: the first of text / sentence / input /
prompt / content the row has) and labelled by its `label_field` (default "label"). A label is one of
the label names, or an integer index into them (SST-2's TSV has 0/1 for negative/positive). Bad rows
(missing field, empty text, unknown label, too long) stop the run with FILE:LINE, or are counted
with `skip_bad_rows`, as for generation data.
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.loops.data import (
    BadRows,
    DataConfig,
    DataError,
    Example,
    TokenRows,
    bad_row,
    data_rows,
    read_examples,
)

TEXT_FIELDS = ("text", "sentence", "input", "prompt", "content")


@dataclass
class ClassificationData(TokenRows):
    """Token ids of each row's rendered text and its class index."""

    ids: list[list[int]]
    labels: list[int]
    examples: list[Example]


def parse_labels(labels) -> list[str]:
    """'negative,positive' or a list -> ['negative', 'positive']."""
    out = [s.strip() for s in (labels.split(",") if isinstance(labels, str) else labels)]
    if len(out) < 2 or any(not s for s in out) or len(set(out)) != len(out):
        raise ValueError(f"--labels needs at least two distinct, non-empty names (e.g. negative,positive), got {labels!r}")
    return out


def label_index(value: str, labels: list[str]) -> int:
    v = value.strip()
    if v in labels:
        return labels.index(v)
    if v.lstrip("-").isdigit() and 0 <= int(v) < len(labels):
        return int(v)
    raise DataError(f"unknown label {value!r}: expected one of {labels} or an index 0..{len(labels) - 1}")


def default_text_field(path, delimiter: str | None = None) -> str:
    """The text column of a file: the first of TEXT_FIELDS that its first row has."""
    for _, row in data_rows(path, delimiter):
        if isinstance(row, dict):
            for f in TEXT_FIELDS:
                if f in row:
                    return f
            raise DataError(f"{path}: no text field ({', '.join(TEXT_FIELDS)}) in the first row (it has "
                            f"{sorted(row)}); pass --template \"{{field}}\"")
    raise DataError(f"{path}: no usable rows")


def read_classification(path, labels: list[str], template: str | None = None, label_field: str | None = None,
                        max_rows: int = 0, skip_bad_rows: bool = False, bad: BadRows | None = None
                        ) -> tuple[list[Example], str]:
    """Examples whose `target` is the class index as a string, and the template used."""
    template = template or "{" + default_text_field(path) + "}"
    cfg = DataConfig(template=template, target=label_field or "label", skip_bad_rows=skip_bad_rows,
                     max_rows=max_rows, max_length=10**9)
    bad = bad if bad is not None else BadRows()
    out = []
    for ex in read_examples(path, cfg, bad):
        try:
            out.append(Example(ex.prompt, str(label_index(ex.target, labels)), ex.where))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{ex.where}: {e} (pass --skip-bad-rows to skip such rows)") from None
            bad.add(ex.where, str(e))
    if not out:
        raise DataError(f"{path}: no usable rows")
    return out, template


def tokenize_classification(examples: list[Example], tokenizer, encoder: bool, max_length: int | None = None,
                            skip_bad_rows: bool = False, bad: BadRows | None = None) -> ClassificationData:
    """Encoders get [CLS] text [SEP] (the tokenizer's special tokens), decoders the bare text (as the
    generation data). A row over `max_length` tokens (None: DataConfig's default) is a bad row."""
    max_length = DataConfig.max_length if max_length is None else max_length
    ids, labels, kept = [], [], []
    for ex in examples:
        t = tokenizer(ex.prompt, add_special_tokens=encoder)["input_ids"]
        if len(t) > max_length or not t:
            reason = f"longer than the limit: {len(t)} tokens > max_length {max_length}" if t else "empty text"
            bad_row(ex.where, reason, skip_bad_rows, bad)
            continue
        ids.append(t)
        labels.append(int(ex.target))
        kept.append(ex)
    if not ids:
        raise DataError("no usable rows after tokenization")
    return ClassificationData(ids, labels, kept)
