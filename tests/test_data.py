"""Data: formats, templates, bad rows (file and line), reference grouping, batching."""

import json

import pytest
from tiny_tokenizer import tiny_tokenizer

from softprompt.loops.data import (
    BadRows,
    DataConfig,
    DataError,
    collate,
    group_references,
    length_grouped_batches,
    read_examples,
    split_heldout,
    tokenize,
)


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_jsonl_formats(tmp_path):
    f = write(tmp_path / "a.jsonl", "\n".join([
        json.dumps({"input": "ba be", "output": "bi"}),
        json.dumps({"prompt": "bo", "completion": "bu ca"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "ce"}, {"role": "assistant", "content": "ci"}]}),
    ]))
    ex = read_examples(f)
    assert [(e.prompt, e.target) for e in ex[:2]] == [("ba be", "bi"), ("bo", "bu ca")]
    assert ex[2].target == "ci" and ex[2].where.endswith(":4")
    tok = tiny_tokenizer()
    data = tokenize(ex[:2], tok)
    # prompt + target + eos; target tokens counted with eos
    assert data.ids[0] == tok("ba be bi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert data.n_target == [2, 3]


def test_csv_template_and_target(tmp_path):
    f = write(tmp_path / "e.csv", 'mr,ref\n"name[ba], food[be]",bi bo\n"name[ca]",cu\n')
    ex = read_examples(f, DataConfig(template="{mr} ||", target="ref"))
    assert ex[0].prompt == "name[ba], food[be] ||" and ex[0].target == "bi bo" and ex[0].where.endswith(":2")
    t = write(tmp_path / "s.tsv", "sentence\tlabel\nba be\t1\n")
    ex = read_examples(t, DataConfig(template="Review: {sentence} Sentiment:", target="{label}"))
    assert ex[0].prompt == "Review: ba be Sentiment:" and ex[0].target == "1"


@pytest.mark.parametrize("content,reason,line", [
    (b'{"input": "ba", "output": "be"}\n{"input": "ba"}\n', "missing field 'output'", 2),
    (b'{"input": "ba", "output": "be"}\n\n{"input": "ba", "output": "  "}\n', "empty text in the target", 3),
    (b'{"input": "ba", "output": "be"}\n{"input": "b\xff", "output": "be"}\n', "not UTF-8", 2),
    (b'{"input": "ba", "output": "be"}\n{"input": "ba", \n', "not valid JSON", 2),
])
def test_bad_rows_stop_with_file_and_line(tmp_path, content, reason, line):
    f = write(tmp_path / "bad.jsonl", content, "wb")
    with pytest.raises(DataError) as e:
        read_examples(f, DataConfig(), BadRows())
    assert f"{f}:{line}: {reason}" in str(e.value) and "--skip-bad-rows" in str(e.value)
    bad = BadRows()
    ex = read_examples(f, DataConfig(skip_bad_rows=True), bad)
    assert len(ex) == 1 and bad.count == 1 and f"bad.jsonl:{line}" in bad.report()


def test_csv_bad_utf8_and_too_long(tmp_path):
    f = write(tmp_path / "x.csv", b"mr,ref\nba,be\nb\xffa,be\nba,be bi bo bu ca ce ci co cu\n", "wb")
    with pytest.raises(DataError, match=r"x\.csv:3: not UTF-8"):
        read_examples(f, DataConfig(template="{mr}", target="ref"))
    cfg = DataConfig(template="{mr}", target="ref", max_length=6, skip_bad_rows=True)
    bad = BadRows()
    data = tokenize(read_examples(f, cfg, bad), tiny_tokenizer(), cfg, bad)
    assert len(data) == 1 and bad.count == 2
    assert "longer than the limit" in bad.report() and "x.csv:4" in bad.report()
    with pytest.raises(DataError, match=r"x\.csv:4: longer than the limit: 11 tokens > max_length 6"):
        tokenize(read_examples(f, DataConfig(template="{mr}", target="ref", skip_bad_rows=True), BadRows()),
                 tiny_tokenizer(), DataConfig(max_length=6))


def test_missing_template_field_names_columns(tmp_path):
    f = write(tmp_path / "e.csv", "mr,ref\nba,be\n")
    with pytest.raises(DataError, match=r"e\.csv:2: missing field 'name'"):
        read_examples(f, DataConfig(template="{name}", target="ref"))


def test_group_references_and_heldout_split(tmp_path):
    f = write(tmp_path / "e.csv", "mr,ref\nba,x1\nbe,y1\nba,x2\nbi,z1\nba,x3\n")
    ex = read_examples(f, DataConfig(template="{mr} ||", target="ref"))
    assert group_references(ex) == [("ba ||", ["x1", "x2", "x3"]), ("be ||", ["y1"]), ("bi ||", ["z1"])]
    train, held = split_heldout(ex, 0.34, seed=0)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held}) and len(train) + len(held) == 5


def test_collate_left_pads_and_marks_targets():
    ids, mask, tmask = collate([[5, 6, 7, 8], [9, 10]], [2, 1], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert tmask.tolist() == [[False, False, True, True], [False, False, False, True]]


def test_length_grouped_batches_cover_each_row_once_and_cut_padding():
    import random

    lengths = [random.Random(i).randint(5, 80) for i in range(500)]
    batches = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    assert batches == length_grouped_batches(lengths, 8, seed=3, epoch=0)  # deterministic
    assert batches != length_grouped_batches(lengths, 8, seed=3, epoch=1)
    pad = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    rnd = list(range(500))
    random.Random(0).shuffle(rnd)
    pad_random = sum(8 * max(lengths[i] for i in rnd[s:s + 8]) - sum(lengths[i] for i in rnd[s:s + 8])
                     for s in range(0, 500, 8))
    assert pad < pad_random / 5
