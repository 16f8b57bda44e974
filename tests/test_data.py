"""Unit tests for cp_dtensor.data (single process, fast, no downloads)."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from cp_dtensor.config import load_config
from cp_dtensor.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    GlobalBatchLoader,
    HFTokenizer,
    SyntheticRecallDataset,
    TextDataset,
    document_positions,
    load_tokenizer,
    validate_token_ids,
)
from cp_dtensor.trainer import _build_data

try:
    import tokenizers
except ImportError:  # the optional extra: pip install "cp_dtensor[hf]" (scripts/test.sh installs it)
    tokenizers = None

needs_tokenizers = pytest.mark.skipif(
    tokenizers is None, reason='the tokenizers library is not installed (pip install "cp_dtensor[hf]")'
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
# Packed documents: document ids, positions
# ---------------------------------------------------------------------------------------------------------


def _documents_corpus(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    """A JSONL file of documents of very different lengths, and each document's byte tokens with BOS/EOS."""
    texts = ["a" * 3, "b" * 20, "c", "d" * 7, "e" * 45, "f" * 2, "g" * 12, "h" * 30, "i" * 5, "j" * 9]
    path = _write(tmp_path / "docs.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    tok = ByteTokenizer()
    return path, [tok.encode(t, bos=True, eos=True) for t in texts]


def test_document_ids_mark_boundaries_and_continue_across_samples(tmp_path: Path) -> None:
    path, docs = _documents_corpus(tmp_path)
    seq = 16
    ds = TextDataset(path, seq_len=seq)
    assert ds.num_documents == len(docs)
    # Expected ids from the documents' lengths alone: the global document of every stream offset.
    owner = [d for d, ids in enumerate(docs) for _ in ids]
    for i in range(len(ds)):
        sample = ds[i]
        ids = sample["document_ids"]
        assert ids.dtype == torch.int64 and ids.shape == (seq,)
        window = owner[i * seq : (i + 1) * seq]
        assert ids.tolist() == [d - window[0] for d in window]  # 0, 1, 2 ... along the sample
        assert int(ids[0]) == 0 and bool((ids.diff() >= 0).all()) and bool((ids.diff() <= 1).all())
        # A new id starts exactly at a BOS; a sample that starts inside a document continues it with id 0.
        starts = (ids.diff() == 1).nonzero().flatten() + 1
        assert (sample["tokens"][starts] == ByteTokenizer.BOS).all()
        assert int((sample["tokens"] == ByteTokenizer.BOS).sum()) == len(starts) + int(
            sample["tokens"][0] == ByteTokenizer.BOS
        )
    # Nothing dropped: gluing the samples' documents back together (a sample whose first token is not a BOS
    # continues the previous sample's last document) gives every document whole, in order.
    rebuilt: list[list[int]] = []
    for i in range(len(ds)):
        tokens, ids = ds[i]["tokens"].tolist(), ds[i]["document_ids"].tolist()
        for d in range(ids[-1] + 1):
            piece = [t for t, j in zip(tokens, ids) if j == d]
            if d == 0 and piece[0] != ByteTokenizer.BOS:
                rebuilt[-1] += piece
            else:
                rebuilt.append(piece)
    covered = len(ds) * seq  # the stream's tail after the last full window is not a sample
    assert sum(map(len, rebuilt)) == covered
    assert rebuilt[:-1] == docs[: len(rebuilt) - 1]
    assert rebuilt[-1] == docs[len(rebuilt) - 1][: len(rebuilt[-1])]
    assert any(
        ds[i]["tokens"][0] != ByteTokenizer.BOS for i in range(len(ds))
    )  # the corpus has continuations


def test_document_ids_do_not_change_tokens_labels_or_positions(tmp_path: Path) -> None:
    path, docs = _documents_corpus(tmp_path)
    stream = [t for ids in docs for t in ids]
    ds = TextDataset(path, seq_len=16)
    for i in range(len(ds)):  # the same windows as before document ids existed (Note [Packed documents])
        assert ds[i]["tokens"].tolist() == stream[i * 16 : i * 16 + 16]
        assert ds[i]["labels"].tolist() == stream[i * 16 + 1 : i * 16 + 17]
        assert ds[i]["positions"].tolist() == list(range(16))


def test_reset_positions_restart_at_each_document(tmp_path: Path) -> None:
    path, _ = _documents_corpus(tmp_path)
    plain = TextDataset(path, seq_len=16)
    reset = TextDataset(path, seq_len=16, reset_positions=True)
    for i in range(len(plain)):
        a, b = plain[i], reset[i]
        for key in ("tokens", "labels", "document_ids"):
            assert torch.equal(a[key], b[key])
        ids, pos = b["document_ids"].tolist(), b["positions"].tolist()
        for j in range(16):  # offset from the first token of the same document in this sample
            assert pos[j] == j - ids.index(ids[j])
        assert pos[0] == 0 and b["positions"].dtype == torch.int64
    # Documents of 5, 22, 3, 9, ... tokens: sample 1 (stream offsets 16..31) holds the last 11 tokens of the
    # second document (a continuation: its positions restart at 0 too), the third whole, the fourth's first 2.
    sample = reset[1]
    assert sample["document_ids"].tolist() == [0] * 11 + [1] * 3 + [2] * 2
    assert sample["positions"].tolist() == [*range(11), 0, 1, 2, 0, 1]


def test_document_positions_batched() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert document_positions(torch.tensor([3, 3, 7])).tolist() == [0, 1, 0]  # any ids, runs count


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
    assert set(batch) == {"tokens", "labels", "positions", "document_ids"}
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


@pytest.mark.parametrize("variant", ["copy", "keyed", "pairs"])
def test_synthetic_cue_region_starts_at_cue_start_fraction(variant: str) -> None:
    seq = 256
    ds = SyntheticRecallDataset(seq, vocab_size=512, seed=0, variant=variant, cue_start_fraction=0.25)
    assert (ds.cue_start, ds.cue_end) == (64, 64 + 25)  # int(0.25 x 256), plus int(0.1 x 256) positions
    v_lo, v_hi = ds.value_range
    for i in range(20):
        tokens, labels = ds[i]["tokens"], ds[i]["labels"]
        value_pos = ((tokens >= v_lo) & (tokens < v_hi)).nonzero().flatten()
        assert ds.cue_start <= int(value_pos.min()) and int(value_pos.max()) < ds.cue_end
        query_pos = (labels != IGNORE_INDEX).nonzero().flatten()
        assert query_pos.tolist() == list(range(seq - ds.num_queries, seq))
        for answer in labels[query_pos].tolist():  # every answer is written in the moved cue region
            assert (tokens[ds.cue_start : ds.cue_end] == answer).any()
    default = SyntheticRecallDataset(seq, vocab_size=512, seed=0, variant=variant)
    assert default.cue_start == 0  # existing users keep the first-10% cue region


def test_synthetic_cue_start_fraction_validation() -> None:
    with pytest.raises(ValueError, match="cue_start_fraction must be in"):
        SyntheticRecallDataset(256, vocab_size=512, seed=0, cue_start_fraction=1.0)
    with pytest.raises(ValueError, match=r"cue region \(positions 230..254\), 1 query marker and 4 queries"):
        SyntheticRecallDataset(256, vocab_size=512, seed=0, cue_start_fraction=0.9)


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


# ---------------------------------------------------------------------------------------------------------
# HuggingFace tokenizer.json
# ---------------------------------------------------------------------------------------------------------

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>")


def _train_bpe(path: Path, special_tokens: Sequence[str] = LLAMA3_SPECIALS) -> Path:
    """A tiny byte-level BPE tokenizer.json (the Llama 3 kind, ~300 ids), trained here: nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(path))
    return path


def _word_level(path: Path, vocab: dict[str, int]) -> Path:
    """A whitespace word-level tokenizer.json with exactly the ids of `vocab`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


@needs_tokenizers
def test_hf_tokenizer_round_trip_and_special_tokens(tmp_path: Path) -> None:
    path = _train_bpe(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.name == str(path)
    assert (tok.bos_token, tok.eos_token) == LLAMA3_SPECIALS
    assert (tok.BOS, tok.EOS) == (0, 1)  # special tokens come first in a trained vocabulary
    reference = tokenizers.Tokenizer.from_file(str(path))
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    text = "the lazy fox, wörld ✓\n\tend"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert ids[1:-1] == reference.encode(text, add_special_tokens=False).ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text  # specials dropped, bytes exact
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.encode_batch(["the fox", "dog"]) == [tok.encode("the fox"), tok.encode("dog")]
    assert load_tokenizer(str(tmp_path)).name == str(path)  # a folder holding tokenizer.json (hf_assets_path)
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} is outside"):
        tok.decode([tok.vocab_size])


@needs_tokenizers
def test_text_dataset_with_hf_tokenizer_packs_its_ids(tmp_path: Path) -> None:
    tok = HFTokenizer(_train_bpe(tmp_path / "tokenizer.json"))
    texts = ["the quick brown fox", "jumps over", "the lazy dog " * 5, "fox"]
    path = _write(tmp_path / "c.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    ds = TextDataset(path, seq_len=8, tokenizer=tok)
    stream = [i for ids in tok.encode_batch(texts, bos=True, eos=True) for i in ids]
    assert ds.tokens.tolist() == stream and ds.vocab_size == tok.vocab_size
    for i in range(len(ds)):
        assert ds[i]["tokens"].tolist() == stream[i * 8 : i * 8 + 8]
        ids = ds[i]["document_ids"]
        starts = (ids.diff() == 1).nonzero().flatten() + 1
        assert (ds[i]["tokens"][starts] == tok.BOS).all()


@needs_tokenizers
def test_hf_tokenizer_ids_beyond_int16_are_kept(tmp_path: Path) -> None:
    # Llama 3's ids go to 128,255: the packed stream must not truncate them.
    vocab = {
        "[UNK]": 0,
        "hello": 1,
        "world": 40_000,
        "<|begin_of_text|>": 128_000,
        "<|end_of_text|>": 128_001,
    }
    tok = HFTokenizer(_word_level(tmp_path / "tokenizer.json", vocab))
    assert (tok.BOS, tok.EOS, tok.vocab_size) == (128_000, 128_001, 128_002)
    path = _write(tmp_path / "c.jsonl", "\n".join(json.dumps({"text": t}) for t in ["hello world", "world"]))
    ds = TextDataset(path, seq_len=4, tokenizer=tok)
    assert ds.tokens.tolist() == [128_000, 1, 40_000, 128_001, 128_000, 40_000, 128_001]
    assert ds[0]["labels"].tolist() == [1, 40_000, 128_001, 128_000]


@needs_tokenizers
def test_hf_tokenizer_with_one_special_token_uses_it_for_both(tmp_path: Path) -> None:
    tok = HFTokenizer(
        _train_bpe(tmp_path / "tokenizer.json", special_tokens=["<|endoftext|>"])
    )  # GPT-2 style
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.BOS == tok.EOS


@needs_tokenizers
def test_hf_tokenizer_errors(tmp_path: Path) -> None:
    missing = tmp_path / "assets" / "tokenizer.json"
    with pytest.raises(
        FileNotFoundError, match=r"assets/tokenizer\.json' not found.*meta-llama/Llama-3\.1-8B"
    ):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json' not found"):
        load_tokenizer(str(tmp_path))  # a folder without a tokenizer.json
    bad = _write(tmp_path / "bad.json", '{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"bad\.json' is not a HuggingFace tokenizer\.json"):
        load_tokenizer(str(bad))
    plain = _word_level(tmp_path / "plain.json", {"[UNK]": 0, "a": 1})
    with pytest.raises(ValueError, match=r"no BOS or EOS special token.*<\|begin_of_text\|>"):
        load_tokenizer(str(plain))
    with pytest.raises(ValueError, match="empty string"):
        load_tokenizer("")


def test_hf_tokenizer_without_the_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    with pytest.raises(ValueError, match=r'needs the tokenizers library: pip install "cp_dtensor\[hf\]"'):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_load_tokenizer_byte() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.name == "byte"
    assert tok.encode_batch(["ab", "c"], bos=True) == [[256, 97, 98], [256, 99]]


# ---------------------------------------------------------------------------------------------------------
# Synthetic recall across documents
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["copy", "keyed", "pairs"])
def test_synthetic_split_documents_separate_cue_and_queries(variant: str) -> None:
    seq = 256
    same = SyntheticRecallDataset(seq, vocab_size=512, seed=0, variant=variant, cue_start_fraction=0.25)
    split = SyntheticRecallDataset(
        seq, vocab_size=512, seed=0, variant=variant, cue_start_fraction=0.25, documents="split"
    )
    assert same.split_position is None and split.split_position == split.cue_end == 89
    v_lo, v_hi = split.value_range
    for i in range(10):
        a, b = same[i], split[i]
        for key in ("tokens", "labels", "positions"):  # the documents change the mask only
            assert torch.equal(a[key], b[key])
        assert a["document_ids"].tolist() == [0] * seq
        ids = b["document_ids"]
        assert ids.tolist() == [0] * 89 + [1] * (seq - 89)
        value_pos = ((b["tokens"] >= v_lo) & (b["tokens"] < v_hi)).nonzero().flatten()
        assert (ids[value_pos] == 0).all()  # every cue in document 0
        query_pos = (b["labels"] != IGNORE_INDEX).nonzero().flatten()
        assert (ids[query_pos] == 1).all() and int(ids[seq - split.num_queries - 1]) == 1  # marker, queries
    reset = SyntheticRecallDataset(seq, vocab_size=512, seed=0, documents="split", reset_positions=True)
    assert reset[0]["positions"].tolist() == [*range(reset.cue_end), *range(seq - reset.cue_end)]


def test_synthetic_default_samples_are_unchanged_by_the_documents_option() -> None:
    default = SyntheticRecallDataset(128, vocab_size=512, seed=3)
    assert default.documents == "same"
    for i in (0, 7):
        for documents in ("same", "split"):
            other = SyntheticRecallDataset(128, vocab_size=512, seed=3, documents=documents)[i]
            assert torch.equal(default[i]["tokens"], other["tokens"])
            assert torch.equal(default[i]["labels"], other["labels"])
    with pytest.raises(ValueError, match=r"documents must be one of \('same', 'split'\), got 'two'"):
        SyntheticRecallDataset(128, vocab_size=512, seed=0, documents="two")


# ---------------------------------------------------------------------------------------------------------
# Loader entries and the trainer's data (config -> dataset)
# ---------------------------------------------------------------------------------------------------------


class _Mixed:
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {k: torch.zeros(4, dtype=torch.int64) for k in ("tokens", "labels", "positions")}
        if index == 1:
            sample["document_ids"] = torch.zeros(4, dtype=torch.int64)
        return sample


def test_loader_stacks_document_ids_and_refuses_mixed_entries(tmp_path: Path) -> None:
    ds = _text_dataset(tmp_path)
    batch = GlobalBatchLoader(ds, global_batch_size=3, seed=0).get_batch(0)
    rows = GlobalBatchLoader(ds, global_batch_size=3, seed=0).sample_indices(0)
    assert torch.equal(batch["document_ids"], torch.stack([ds[i]["document_ids"] for i in rows]))
    with pytest.raises(ValueError, match=r"samples disagree on their entries: sample 0 has .*sample 1 has"):
        GlobalBatchLoader(_Mixed(), global_batch_size=2, shuffle=False).get_batch(0)


def _config(*args: str):
    return load_config(["--training.seq_len", "256", *args])


def test_build_data_text_with_documents_and_tokenizer(tmp_path: Path) -> None:
    path, _ = _documents_corpus(tmp_path)
    text = ("--data.dataset", "text", "--data.paths", str(path), "--training.seq_len", "16")
    text += ("--job.dump_folder", str(tmp_path))  # the token cache goes under it
    data = _build_data(_config(*text), 258, 2)
    assert data.chance_loss is None and "10 documents" in data.summary and "byte tokenizer" in data.summary
    assert set(next(data.loader)) == {"tokens", "labels", "positions", "document_ids"}
    with pytest.raises(
        ValueError, match=r"data.tokenizer 'byte' uses token ids up to 257 but .*vocab_size 200"
    ):
        _build_data(_config(*text), 200, 2)
    nope = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"^data.tokenizer: tokenizer file .*nope.json' not found"):
        _build_data(_config(*text, "--data.tokenizer", nope), 258, 2)


@needs_tokenizers
def test_build_data_refuses_a_tokenizer_larger_than_the_model(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "c.txt", "the quick brown fox jumps over the lazy dog " * 20)
    tok_path = _train_bpe(tmp_path / "tokenizer.json")
    vocab = HFTokenizer(tok_path).vocab_size
    args = ("--data.dataset", "text", "--data.paths", str(corpus), "--data.tokenizer", str(tok_path))
    args += ("--job.dump_folder", str(tmp_path))
    data = _build_data(_config(*args, "--training.seq_len", "16"), vocab, 2)
    batch = next(data.loader)
    assert int(batch["tokens"].max()) < vocab and set(batch) == {
        "tokens",
        "labels",
        "positions",
        "document_ids",
    }
    with pytest.raises(
        ValueError, match=rf"uses token ids up to {vocab - 1} but flavor 'debug' has vocab_size 258"
    ):
        _build_data(_config(*args), 258, 2)


def test_build_data_recall_documents_and_reset_positions(tmp_path: Path) -> None:
    mask = ("--model.attention_mask", "document_causal")
    data = _build_data(_config(*mask, "--data.recall_documents", "split"), 512, 2)
    batch = next(data.loader)
    split = SyntheticRecallDataset(256, 512, cue_repeats=4, cue_start_fraction=0.25, documents="split")
    assert (batch["document_ids"][:, split.cue_end :] == 1).all() and (
        batch["document_ids"][:, : split.cue_end] == 0
    ).all()
    assert "two documents split at position" in data.summary
    assert (next(_build_data(_config(*mask), 512, 2).loader)["document_ids"] == 0).all()  # default "same"
    with pytest.raises(
        ValueError, match=r'recall_documents "split" .*use model.attention_mask "document_causal"'
    ):
        _build_data(_config("--data.recall_documents", "split"), 512, 2)
    # Per-document positions, with causal attention and with the document mask (the trainer then gives
    # them to the model as rope_positions and keeps the tokens' places as positions).
    path, _ = _documents_corpus(tmp_path)
    text = ("--data.dataset", "text", "--data.paths", str(path), "--training.seq_len", "16")
    text += ("--job.dump_folder", str(tmp_path))
    for extra in ((), mask):
        batch = next(_build_data(_config(*text, *extra, "--data.reset_positions"), 258, 4).loader)
        assert torch.equal(batch["positions"], document_positions(batch["document_ids"]))


def test_sft_records_longer_than_a_sample_keep_their_completion(tmp_path: Path) -> None:
    """A record that does not fit loses the start of its prompt, never its completion: the tokens the loss
    counts survive (a record cut at its end used to lose its completion, and a batch of such records had no
    counted token at all)."""
    from cp_dtensor.data.sft import SFTDataset
    from cp_dtensor.train_step import IGNORE_INDEX

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 50, "completion": "ABC"}) + "\n")
    data = SFTDataset(path, 16)  # byte tokenizer: BOS + 50 prompt bytes + 3 completion bytes + EOS
    sample = data[0]
    assert data.num_truncated == 1
    counted = sample["tokens"][1:][
        sample["labels"][:-1] != IGNORE_INDEX
    ].tolist()  # inputs whose next is counted
    assert bytes(t for t in sample["labels"].tolist() if 0 <= t < 256) == b"ABC"
    assert len(counted) == 4 and sample["tokens"][-4:].tolist()[:3] == list(b"ABC")


def _sft_reference(records: list[tuple[str, str]], seq_len: int) -> list[dict[str, list[int]]]:
    """Note [Loss-masked packing] record by record, in plain Python (byte tokenizer)."""
    bos, eos, samples, used = 256, 257, [[]], 0
    for prompt, completion in records:
        p, c = [bos, *prompt.encode()], [*completion.encode(), eos]
        if len(p) + len(c) > seq_len:
            p, c = p[len(p) - max(0, seq_len - len(c)) :] if seq_len > len(c) else [], c[:seq_len]
        if used + len(p) + len(c) > seq_len:
            samples.append([])
            used = 0
        samples[-1].append((p, c))
        used += len(p) + len(c)
    out = []
    for sample in samples:
        tokens, labels, docs = [], [], []
        for doc, (p, c) in enumerate(sample):
            ids = p + c
            tokens += ids
            docs += [doc] * len(ids)
            labels += [ids[j + 1] if j + 1 >= max(len(p), 1) else -100 for j in range(len(ids) - 1)] + [-100]
        pad = seq_len - len(tokens)
        out.append(
            {
                "tokens": tokens + [eos] * pad,
                "labels": labels + [-100] * pad,
                "docs": docs + [len(sample)] * pad,
            }
        )
    return out


def test_sft_packing_equals_the_record_by_record_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compact SFT storage (Note [Loss-masked packing]: flat id parts, record tables) gives the samples of
    the rule applied record by record: two files of a folder, records longer than a sample, empty prompts,
    non-ASCII text and a raw U+2028 inside a JSON string (one record, not two lines); 3 records per
    tokenized batch so samples straddle id parts."""
    from cp_dtensor.data import sft

    monkeypatch.setattr(sft, "_RECORDS_PER_BATCH", 3)
    gen = torch.Generator().manual_seed(0)
    records = []
    for i in range(40):
        n_p, n_c = (int(x) for x in torch.randint(0, 30, (2,), generator=gen))
        records.append(("é" * (n_p // 4) + "p" * n_p, f"c{i}\u2028" + "x" * n_c))
    (tmp_path / "d").mkdir()
    for name, part in (("a.jsonl", records[:25]), ("b.jsonl", records[25:])):
        lines = [json.dumps({"q": p, "a": c}, ensure_ascii=False) for p, c in part]
        (tmp_path / "d" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = sft.SFTDataset(tmp_path / "d", 24, prompt_field="q", completion_field="a")
    expected = _sft_reference(records, 24)
    assert data.num_documents == 40 and len(data) == len(expected) and len(data._id_parts) == 14
    counted = 0
    for i, ref in enumerate(expected):
        sample = data[i]
        assert sample["tokens"].tolist() == ref["tokens"], i
        assert sample["labels"].tolist() == ref["labels"], i
        assert sample["document_ids"].tolist() == ref["docs"], i
        counted += sum(label != -100 for label in ref["labels"])
    assert data.num_counted == counted


def test_a_batch_without_counted_labels_is_skipped_not_nan() -> None:
    """No counted label in the global batch: no update and no NaN stop (the loss is undefined, not infinite)."""
    from cp_dtensor.models.llama import build_llama
    from cp_dtensor.train_step import IGNORE_INDEX, train_step

    model = build_llama("debug")
    model.init_weights(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.1)
    tokens = torch.randint(0, 512, (2, 16))
    batch = {
        "tokens": tokens,
        "labels": torch.full_like(tokens, IGNORE_INDEX),
        "positions": torch.arange(16).expand(2, 16),
    }
    result = train_step([model], [opt], batch, loss_mesh=None)
    assert result.skipped and result.tokens == 0 and result.loss == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_checkpoint_of_another_sample_order_is_refused() -> None:
    """A loader state saved before the table-free shuffle (no "order") would resume into other batches than
    the checkpointed run's: refused in one line instead of training on quietly."""
    from cp_dtensor.data import GlobalBatchLoader
    from cp_dtensor.data.loader import ORDER

    data = [{"tokens": torch.tensor([i])} for i in range(16)]
    loader = GlobalBatchLoader(data, 4, seed=0)
    state = loader.state_dict()
    assert state["order"] == ORDER
    GlobalBatchLoader(data, 4, seed=0).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "order"}
    with pytest.raises(ValueError, match="drawn in order 'randperm"):
        GlobalBatchLoader(data, 4, seed=0).load_state_dict(old)
