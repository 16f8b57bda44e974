"""Unit tests for cp_dtensor.data (single process, fast, no downloads)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from cp_dtensor.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    GlobalBatchLoader,
    SyntheticRecallDataset,
    TextDataset,
    validate_token_ids,
)

# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Hello, wörld! ✓ \n\tend"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.BOS == 256 and ids[-1] == tok.EOS == 257
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.vocab_size == 258
    with pytest.raises(ValueError, match="258"):
        tok.decode([300])


# ---------------------------------------------------------------------------------------------------------
# Text dataset
# ---------------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_text_packing_windows_and_label_shift(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", "abcdefghij")
    b = _write(tmp_path / "b.txt", "XYZ")
    ds = TextDataset([a, b], seq_len=4)
    tok = ByteTokenizer()
    stream = tok.encode("abcdefghij", bos=True, eos=True) + tok.encode("XYZ", bos=True, eos=True)
    assert ds.num_tokens == len(stream) == 17
    assert len(ds) == (17 - 1) // 4 == 4
    for i in range(len(ds)):
        sample = ds[i]
        window = stream[i * 4 : i * 4 + 5]
        assert sample["tokens"].tolist() == window[:-1]
        assert sample["labels"].tolist() == window[1:]
        assert sample["positions"].tolist() == [0, 1, 2, 3]
        assert all(t.dtype == torch.int64 for t in sample.values())
    # Every token but the first is a label exactly once.
    labels = torch.cat([ds[i]["labels"] for i in range(len(ds))]).tolist()
    assert labels == stream[1:]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_jsonl_documents_and_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"body": "first doc", "id": 1}), "", json.dumps({"body": "second"})]
    _write(path, "\n".join(lines) + "\n")
    ds = TextDataset(path, seq_len=4, text_field="body")
    tok = ByteTokenizer()
    expected = tok.encode("first doc", bos=True, eos=True) + tok.encode("second", bos=True, eos=True)
    assert ds.num_documents == 2
    assert ds.tokens.tolist() == expected


def test_directory_expands_to_sorted_files(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "bbbb")
    _write(tmp_path / "a.jsonl", json.dumps({"text": "aaaa"}))
    _write(tmp_path / "ignored.md", "zzzz")
    ds = TextDataset(tmp_path, seq_len=4)
    assert [p.name for p in ds.files] == ["a.jsonl", "b.txt"]
    assert ByteTokenizer().decode(ds.tokens.tolist()) == "aaaabbbb"


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        TextDataset(missing, seq_len=4)


def test_empty_file_names_path(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        TextDataset(empty, seq_len=4)
    blank = _write(tmp_path / "blank.jsonl", "\n\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl"):
        TextDataset(blank, seq_len=4)


def test_jsonl_without_any_text(tmp_path: Path) -> None:
    path = _write(tmp_path / "notext.jsonl", json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}))
    with pytest.raises(ValueError, match=r"notext\.jsonl has no text"):
        TextDataset(path, seq_len=4)


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: line is not valid JSON"):
        TextDataset(path, seq_len=4)


def test_jsonl_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "field.jsonl", "\n".join(json.dumps(r) for r in [{"text": "a"}, {"txt": "b"}]))
    with pytest.raises(ValueError, match=r"field\.jsonl:2: .*no field 'text'.*\['txt'\]"):
        TextDataset(path, seq_len=4)
    not_object = _write(tmp_path / "list.jsonl", "[1, 2]\n")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: .*no field 'text'"):
        TextDataset(not_object, seq_len=4)
    not_string = _write(tmp_path / "num.jsonl", json.dumps({"text": 5}))
    with pytest.raises(ValueError, match=r"num\.jsonl:1: field 'text' must be a string"):
        TextDataset(not_string, seq_len=4)


def test_unsupported_suffix_and_empty_path_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.csv", "a,b")
    with pytest.raises(ValueError, match=r"x\.csv"):
        TextDataset(path, seq_len=4)
    with pytest.raises(ValueError, match="at least one path"):
        TextDataset([], seq_len=4)


def test_corpus_shorter_than_one_window(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.txt", "abc")  # 3 bytes + BOS + EOS = 5 tokens
    with pytest.raises(ValueError, match=r"has 5 tokens.*seq_len=8 needs 9"):
        TextDataset(path, seq_len=8)
    assert len(TextDataset(path, seq_len=4)) == 1  # exactly one window of 5 tokens


# ---------------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------------


def _text_dataset(tmp_path: Path, seq_len: int = 8) -> TextDataset:
    docs = [json.dumps({"text": f"document number {i} " * (i % 3 + 1)}) for i in range(20)]
    return TextDataset(_write(tmp_path / "c.jsonl", "\n".join(docs)), seq_len=seq_len)


def test_loader_batch_shapes_and_determinism(tmp_path: Path) -> None:
    ds = _text_dataset(tmp_path)
    a = GlobalBatchLoader(ds, global_batch_size=6, seed=1)
    b = GlobalBatchLoader(ds, global_batch_size=6, seed=1)
    c = GlobalBatchLoader(ds, global_batch_size=6, seed=2)
    batches_a = [next(a) for _ in range(5)]
    batches_b = [next(b) for _ in range(5)]
    batch = batches_a[0]
    assert set(batch) == {"tokens", "labels", "positions"}
    for value in batch.values():
        assert value.shape == (6, 8) and value.dtype == torch.int64
    for x, y in zip(batches_a, batches_b):
        for key in x:
            assert torch.equal(x[key], y[key])
    # Batch k is a pure function of (dataset, seed, k): random access gives the same as iteration.
    assert torch.equal(a.get_batch(3)["tokens"], batches_a[3]["tokens"])
    assert not torch.equal(next(c)["tokens"], batches_a[0]["tokens"])


def test_loader_epoch_shuffling_covers_each_sample_once_per_epoch(tmp_path: Path) -> None:
    ds = _text_dataset(tmp_path)
    n = len(ds)
    loader = GlobalBatchLoader(ds, global_batch_size=1, seed=0)
    epoch0 = [loader.sample_indices(k)[0] for k in range(n)]
    epoch1 = [loader.sample_indices(k)[0] for k in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != list(range(n)) and epoch0 != epoch1  # shuffled, and differently each epoch
    ordered = GlobalBatchLoader(ds, global_batch_size=1, seed=0, shuffle=False)
    assert [ordered.sample_indices(k)[0] for k in range(n + 2)] == [*range(n), 0, 1]


def test_loader_resume_via_state_dict(tmp_path: Path) -> None:
    ds = _text_dataset(tmp_path)
    uninterrupted = GlobalBatchLoader(ds, global_batch_size=3, seed=5)
    expected = [next(uninterrupted) for _ in range(12)]

    first = GlobalBatchLoader(ds, global_batch_size=3, seed=5)
    for _ in range(7):
        next(first)
    state = first.state_dict()
    assert state["batches_consumed"] == 7
    resumed = GlobalBatchLoader(ds, global_batch_size=3, seed=5)
    resumed.load_state_dict(state)
    for k in range(7, 12):
        got = next(resumed)
        for key in got:
            assert torch.equal(got[key], expected[k][key])

    other = GlobalBatchLoader(ds, global_batch_size=4, seed=5)
    with pytest.raises(ValueError, match="global_batch_size=3"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# Synthetic recall
# ---------------------------------------------------------------------------------------------------------


def _ranges_disjoint(ds: SyntheticRecallDataset) -> None:
    ranges = [ds.filler_range, ds.key_range, ds.value_range, (ds.query_marker, ds.query_marker + 1)]
    for (lo_a, hi_a), (lo_b, hi_b) in itertools.pairwise(ranges):
        assert lo_a <= hi_a <= lo_b <= hi_b
    assert ds.query_marker < ds.vocab_size


@pytest.mark.parametrize("variant", ["copy", "keyed", "pairs"])
def test_synthetic_sample_structure(variant: str) -> None:
    seq = 256
    ds = SyntheticRecallDataset(seq, vocab_size=512, seed=0, variant=variant)
    _ranges_disjoint(ds)
    assert ds.chance_loss == pytest.approx(math.log(16))
    v_lo, v_hi = ds.value_range
    k_lo, k_hi = ds.key_range
    for i in range(20):
        sample = ds[i]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == labels.shape == (seq,)
        assert torch.equal(sample["positions"], torch.arange(seq))
        assert int(tokens.min()) >= 0 and int(tokens.max()) < 512
        query_pos = (labels != IGNORE_INDEX).nonzero().flatten()
        # Only the last num_queries positions carry labels; all others are ignored.
        assert query_pos.tolist() == list(range(seq - ds.num_queries, seq))
        assert int(tokens[seq - ds.num_queries - 1]) == ds.query_marker
        answers = labels[query_pos]
        assert ((answers >= v_lo) & (answers < v_hi)).all()
        # Values appear only in the cue region (first 10%), never near or after the queries.
        is_value = (tokens >= v_lo) & (tokens < v_hi)
        value_pos = is_value.nonzero().flatten()
        assert int(value_pos.max()) < ds.cue_end <= seq // 10
        # Every answer is present in the cue region, far (> 80% of the sequence) from its query.
        for pos, answer in zip(query_pos.tolist(), answers.tolist()):
            cue_positions = (tokens == answer).nonzero().flatten()
            assert cue_positions.numel() >= 1
            assert pos - int(cue_positions.max()) > 0.8 * seq
        if variant == "copy":
            assert (tokens[query_pos] == ds.query_marker).all()
            assert answers.unique().numel() == 1
        else:
            queries = tokens[query_pos]
            assert ((queries >= k_lo) & (queries < k_hi)).all()
            assert queries.unique().numel() == queries.numel()
        if variant == "keyed":  # the answer lies in the query key's own value sub-range
            assert torch.equal((answers - v_lo) // ds.num_values, tokens[query_pos] - k_lo)
        if variant == "pairs":  # the answer follows the query key in the cue region
            for key, answer in zip(tokens[query_pos].tolist(), answers.tolist()):
                key_pos = (tokens[: ds.cue_end] == key).nonzero().flatten()
                assert (tokens[key_pos + 1] == answer).all()


def test_synthetic_is_pure_function_of_seed_and_index() -> None:
    a = SyntheticRecallDataset(128, vocab_size=512, seed=3)
    b = SyntheticRecallDataset(128, vocab_size=512, seed=3)
    c = SyntheticRecallDataset(128, vocab_size=512, seed=4)
    for i in (0, 5, 1000):
        for key in ("tokens", "labels"):
            assert torch.equal(a[i][key], b[i][key])
            assert torch.equal(a[i][key], a[i][key])  # no hidden state between calls
    _ = [a[j] for j in range(10)]  # reading other samples in between changes nothing
    assert torch.equal(a[5]["tokens"], b[5]["tokens"])
    assert not torch.equal(a[0]["tokens"], a[1]["tokens"])
    assert not torch.equal(a[0]["tokens"], c[0]["tokens"])


def test_synthetic_validation() -> None:
    with pytest.raises(ValueError, match="vocab_size=40"):
        SyntheticRecallDataset(256, vocab_size=40, seed=0, num_filler=30)
    with pytest.raises(ValueError, match="seq_len"):
        SyntheticRecallDataset(48, vocab_size=512, seed=0, variant="keyed")
    with pytest.raises(ValueError, match="variant"):
        SyntheticRecallDataset(256, vocab_size=512, seed=0, variant="nope")
    with pytest.raises(ValueError, match="num_queries=5"):
        SyntheticRecallDataset(256, vocab_size=512, seed=0, variant="pairs", num_queries=5)
    # The byte-tokenizer vocabulary (258) is large enough for the defaults.
    ds = SyntheticRecallDataset(256, vocab_size=258, seed=0)
    _ranges_disjoint(ds)


def test_synthetic_with_loader_and_model_vocab() -> None:
    ds = SyntheticRecallDataset(64, vocab_size=512, seed=0)
    loader = GlobalBatchLoader(ds, global_batch_size=4, seed=0)
    batch = next(loader)
    assert batch["tokens"].shape == (4, 64)
    validate_token_ids(batch["tokens"], 512)


# ---------------------------------------------------------------------------------------------------------
# Token id validation
# ---------------------------------------------------------------------------------------------------------


def test_validate_token_ids() -> None:
    validate_token_ids(torch.tensor([[0, 5, 9]]), 10)
    validate_token_ids(torch.empty(0, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match=r"token id 10 .*vocab_size=10"):
        validate_token_ids(torch.tensor([[0, 10, 3]]), 10)
    with pytest.raises(ValueError, match=r"token id -1 .*vocab_size=10"):
        validate_token_ids(torch.tensor([-1, 2]), 10)
