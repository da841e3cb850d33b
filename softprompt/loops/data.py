"""Data: read examples (JSONL, CSV/TSV, HuggingFace `datasets`), render prompts, tokenize, batch.

An example is a `(prompt, target)` pair of strings. For a causal LM the training sequence is

    [prompt tokens | target tokens | eos]        loss on the target tokens and eos only

Formats (one row -> one example):
  JSONL  {"input", "output"} | {"prompt", "completion"} | {"messages": [{"role", "content"}, ...]}
         (chat: the last assistant message is the target, the messages before it the prompt)
  CSV/TSV  a header row; `template` ("{mr} ||") renders the prompt from columns, `target` names
         the target column (this pair is the column mapping)
  hf:NAME[:SPLIT]  a HuggingFace dataset (needs the optional `datasets` package), same mapping

A bad row (missing field, empty text, bytes that are not UTF-8, longer than `max_length` tokens)
stops the run with the file and line number, or with `skip_bad_rows` is counted and reported.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompt.loops.config import DataConfig  # noqa: F401  (public here too)


class DataError(ValueError):
    """A data file or row cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    where: str = ""  # "file:line", for messages


@dataclass
class BadRows:
    """Bad rows seen with `skip_bad_rows`: a count per reason and the first few locations."""

    count: int = 0
    reasons: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        key = reason.split(":")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def report(self) -> str:
        if not self.count:
            return "no bad rows"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.reasons.items()))
        return f"skipped {self.count} bad rows ({kinds}); first: " + "; ".join(self.examples)


# --------------------------------------------------------------------------------------------
# Reading rows

DEFAULT_FIELDS = (("input", "output"), ("prompt", "completion"))


def _render(template: str, row: dict, where: str) -> str:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    missing = [n for n in names if n not in row or row[n] is None]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (row has {sorted(row)})")
    return template.format(**{n: row[n] for n in names})


def row_to_example(row: dict, cfg: DataConfig, where: str) -> Example:
    """One example from one row (a dict of fields); raises DataError naming `where`."""
    if "messages" in row and cfg.template is None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise DataError(f"{where}: missing field: 'messages' must be a list ending with an assistant message")
        if len(msgs) < 2:
            raise DataError(f"{where}: empty text: 'messages' has no prompt before the assistant message")
        return Example(("\x00chat", json.dumps(msgs[:-1])), str(msgs[-1].get("content") or ""), where)  # type: ignore[arg-type]
    if cfg.template is not None:
        prompt = _render(cfg.template, row, where)
        tfield = cfg.target
        if tfield is None:
            tfield = next((t for p, t in DEFAULT_FIELDS if t in row), None)
            if tfield is None:
                raise DataError(f"{where}: missing field: no target column; pass --target (row has {sorted(row)})")
    else:
        pair = next(((p, t) for p, t in DEFAULT_FIELDS if p in row), None)
        if pair is None:
            raise DataError(f"{where}: missing field: expected 'input'/'output', 'prompt'/'completion' or "
                            f"'messages', or pass --template and --target (row has {sorted(row)})")
        if pair[0] not in row or row[pair[0]] is None:
            raise DataError(f"{where}: missing field {pair[0]!r}")
        prompt, tfield = str(row[pair[0]]), cfg.target or pair[1]
    if "{" in tfield:
        target = _render(tfield, row, where)
    else:
        if tfield not in row or row[tfield] is None:
            raise DataError(f"{where}: missing field {tfield!r} (row has {sorted(row)})")
        target = str(row[tfield])
    return Example(prompt, target, where)


def jsonl_rows(path: Path):
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                row = json.loads(text)
            except ValueError as e:
                yield where, DataError(f"{where}: not valid JSON ({e})")
                continue
            if not isinstance(row, dict):
                yield where, DataError(f"{where}: missing field: a row must be a JSON object")
                continue
            yield where, row


def csv_rows(path: Path, delimiter: str | None):
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    delim = delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if any(isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v) for v in row.values()):
            yield where, DataError(f"{where}: not UTF-8 (undecodable bytes in this row)")
            continue
        if None in row:  # more cells than header columns
            yield where, DataError(f"{where}: missing field: the row has more cells than the header")
            continue
        yield where, row


def hf_rows(spec: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{spec}: reading HuggingFace datasets needs the [hf] extra: pip install 'softprompt[hf]'") from e
    name, _, split = spec.removeprefix("hf:").partition(":")
    ds = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(name, split=split or "train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or "train"]
    for n, row in enumerate(ds):
        yield f"{spec}[{n}]", row


def data_rows(path: str | os.PathLike, delimiter: str | None = None):
    """(where, row) for each row of a file (by extension: .jsonl/.json/.ndjson, .csv/.tsv/.tab/.txt)
    or of `hf:NAME[:SPLIT]`."""
    spec = str(path)
    if spec.startswith("hf:"):
        return hf_rows(spec)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return jsonl_rows(p)
    if suffix in (".csv", ".tsv", ".tab", ".txt"):
        return csv_rows(p, delimiter)
    raise DataError(f"{p}: unknown data format {suffix!r}; use .jsonl, .csv, .tsv or hf:NAME")


def read_examples(path: str | os.PathLike, cfg: DataConfig = DataConfig(), bad: BadRows | None = None) -> list[Example]:
    """Examples from a file (by extension: .jsonl/.json, .csv, .tsv) or `hf:NAME[:SPLIT]`."""
    spec = str(path)
    rows = data_rows(path, cfg.delimiter)
    out = []
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            ex = row_to_example(row, cfg, where)
            if not _text(ex.prompt).strip():
                raise DataError(f"{where}: empty text in the prompt")
            if not ex.target.strip():
                raise DataError(f"{where}: empty text in the target")
        except DataError as e:
            if bad is None or not cfg.skip_bad_rows:
                raise DataError(f"{e} (pass --skip-bad-rows to skip such rows)" if bad is not None else str(e)) from None
            bad.add(where, str(e).split(": ", 1)[-1])
            continue
        out.append(ex)
        if cfg.max_rows and len(out) >= cfg.max_rows:
            break
    if not out:
        raise DataError(f"{spec}: no usable rows")
    return out


def _text(prompt) -> str:
    return prompt[1] if isinstance(prompt, tuple) else prompt


def render_prompt(ex_prompt, tokenizer, chat_template: bool) -> str:
    """The prompt text the model sees: plain, or wrapped in the tokenizer's chat template."""
    if isinstance(ex_prompt, tuple):  # chat messages
        msgs = json.loads(ex_prompt[1])
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m.get('role')}: {m.get('content')}\n" for m in msgs) + "assistant:"
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--chat-template: this tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": ex_prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return ex_prompt


def join_target(prompt: str, target: str) -> str:
    """The target as continued text: one space after a prompt that does not end in whitespace."""
    if prompt and not prompt[-1].isspace() and not target[:1].isspace():
        return " " + target
    return target


# --------------------------------------------------------------------------------------------
# Tokenizing and batching


class TokenRows:
    """What the training loop reads of any tokenized data: `ids` per row (and so their lengths, for
    length-grouped batches). Each task adds what a row is scored against."""

    ids: list[list[int]]

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


@dataclass
class TokenizedData(TokenRows):
    """Token ids of `prompt + target + eos` per example and the number of target tokens (with eos)."""

    ids: list[list[int]]
    n_target: list[int]
    examples: list[Example]


def bad_row(where: str, reason: str, skip_bad_rows: bool, bad: BadRows | None) -> None:
    """Stop at a bad row (its file and line in the message), or count it when skipping is on."""
    if bad is None or not skip_bad_rows:
        raise DataError(f"{where}: {reason} (pass --skip-bad-rows to skip such rows)")
    bad.add(where, reason)


def keep_fitting(examples: list[Example], encode, cfg: DataConfig, bad: BadRows | None) -> TokenizedData:
    """The rows whose `encode(example)` -> (prompt ids, target ids) fit `cfg.max_length` together; an
    over-long or empty one is a bad row (stopped at, or counted with --skip-bad-rows). Every family's
    tokenization ends here."""
    ids, n_target, kept = [], [], []
    for ex in examples:
        p, t = encode(ex)
        if len(p) + len(t) > cfg.max_length or not p:
            reason = (f"longer than the limit: {len(p) + len(t)} tokens > max_length {cfg.max_length}"
                      if p else "empty text: the prompt has no tokens")
            bad_row(ex.where, reason, cfg.skip_bad_rows, bad)
            continue
        ids.append(p + t)
        n_target.append(len(t))
        kept.append(ex)
    if not ids:
        raise DataError("no usable rows after tokenization")
    return TokenizedData(ids, n_target, kept)


def tokenize(examples: list[Example], tokenizer, cfg: DataConfig = DataConfig(), bad: BadRows | None = None) -> TokenizedData:
    eos = tokenizer.eos_token_id

    def encode(ex):
        prompt = render_prompt(ex.prompt, tokenizer, cfg.chat_template)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(join_target(prompt, ex.target), add_special_tokens=False)["input_ids"]
        return p, t + ([eos] if eos is not None else [])

    return keep_fitting(examples, encode, cfg, bad)


def collate(rows: list[list[int]], n_target: list[int], pad_id: int):
    """Left-padded (input_ids, attention_mask, target_mask), each (B, T); target_mask marks the
    target tokens (the last `n_target[i]` real tokens of row i)."""
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    tmask = torch.zeros(B, T, dtype=torch.bool)
    for i, (r, n) in enumerate(zip(rows, n_target)):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
        tmask[i, T - n:] = True
    return ids, mask, tmask


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, mega: int = 32) -> list[list[int]]:
    """One epoch of batches of similar length, in a random order fixed by (seed, epoch).

    Shuffle, cut into chunks of `mega` batches, sort each chunk by length (longest first) and
    cut it into batches, then shuffle the batches: padding drops to a few tokens per row while
    batches stay random. Every index appears once; the last batch may be smaller.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    chunk = batch_size * mega
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: -lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def group_references(examples: list[Example]) -> list[tuple[object, list[str]]]:
    """Evaluation inputs with all their references, in first-seen order (E2E: many per MR)."""
    groups: dict = {}
    for ex in examples:
        groups.setdefault(ex.prompt, []).append(ex.target)
    return list(groups.items())


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the distinct prompts (all their references go together, so no input
    is both trained on and evaluated)."""
    prompts = list(dict.fromkeys(ex.prompt for ex in examples))
    random.Random(seed).shuffle(prompts)
    n = max(1, round(len(prompts) * fraction))
    held = set(prompts[:n])
    return [e for e in examples if e.prompt not in held], [e for e in examples if e.prompt in held]


def subset_inputs(examples: list[Example], n: int, seed: int) -> list[Example]:
    """The rows of `n` distinct inputs drawn at random (fixed by `seed`), each with all its rows
    (E2E: an MR with all its references), in the rows' own order. The draw is the first `n` of one
    permutation of the distinct inputs per seed, so for one seed a smaller subset lies inside every
    larger one (50 inside 200); `n` at or above the number of inputs: every row."""
    if n < 1:
        raise ValueError(f"a subset needs at least one input, got {n}")
    prompts = list(dict.fromkeys(ex.prompt for ex in examples))
    random.Random(seed).shuffle(prompts)
    keep = set(prompts[:n])
    return [e for e in examples if e.prompt in keep]
