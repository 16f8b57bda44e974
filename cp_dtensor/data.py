"""Data: tokenizers (bytes, or a HuggingFace tokenizer.json), local text datasets of packed documents, a
synthetic long-range recall task, a global batch loader.

Nothing is downloaded. Every batch is a pure function of (dataset, seed, batch index): the loader produces the
*global* batch and each rank takes its rows and sequence shard with `cp_dtensor.shard_batch`, so the data seen by
the model does not depend on the parallel degrees, and a resumed run sees exactly the batches an
uninterrupted one would.

A sample is a dict of (S,) int64 tensors; a batch stacks them to (G, S):

* `tokens`: model inputs.
* `labels`: targets for each position, `IGNORE_INDEX` (-100) where no loss is taken.
* `positions`: token positions for RoPE: the global positions `arange(S)` (context parallelism shards them
  with the tokens), or with `reset_positions` the position inside each document (Note [Packed documents]).
* `document_ids`: the document of each token, `0, 1, 2, ...` along the sample (the model's
  `document_causal` mask keeps attention inside a document). `TextDataset` and `SyntheticRecallDataset`
  always emit it; the trainer drops it unless `model.attention_mask = "document_causal"`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = [
    "HF_BOS_TOKENS",
    "HF_EOS_TOKENS",
    "IGNORE_INDEX",
    "RECALL_CUE_START_FRACTION",
    "ByteTokenizer",
    "GlobalBatchLoader",
    "HFTokenizer",
    "SyntheticRecallDataset",
    "TextDataset",
    "Tokenizer",
    "document_positions",
    "load_tokenizer",
    "validate_token_ids",
]

IGNORE_INDEX = -100
"""Label value that the loss ignores (`F.cross_entropy(..., ignore_index=-100)`)."""

Sample = dict[str, torch.Tensor]

RECALL_CUE_START_FRACTION = 0.25
"""Where the trainers start the synthetic recall task's cue region: from S/4, which is on another CP rank
than the last positions (the queries) for any cp >= 2 under zigzag or contiguous (Note [Recall across CP
ranks] in cp_dtensor.trainer)."""


def _mix_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a stable (platform- and process-independent) function of `parts`."""
    text = ":".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What the datasets need of a tokenizer: ids below `vocab_size`, one BOS and one EOS id, encode/decode.

    Attributes:
        name: What the tokenizer is, for logs and messages (e.g. "byte", or the tokenizer.json path).
        BOS: Beginning-of-document id.
        EOS: End-of-document id.
        vocab_size: Every id is in [0, vocab_size): the model's vocabulary must be at least this large.
    """

    name: str
    BOS: int
    EOS: int
    vocab_size: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False
    ) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, plus BOS and EOS.

    Attributes:
        name: "byte".
        BOS: Beginning-of-document id (256).
        EOS: End-of-document id (257).
        vocab_size: 258.
    """

    name: str = "byte"
    BOS: int = 256
    EOS: int = 257
    vocab_size: int = 258

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text as its UTF-8 bytes.

        Args:
            text: The text.
            bos: Prepend `BOS`.
            eos: Append `EOS`.

        Returns:
            Token ids.
        """
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.BOS)
        if eos:
            ids.append(self.EOS)
        return ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` of each text.

        Args:
            texts: The texts.
            bos: Prepend `BOS` to each.
            eos: Append `EOS` to each.

        Returns:
            Token ids per text.
        """
        return [self.encode(text, bos=bos, eos=eos) for text in texts]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids back to text; special ids are dropped, invalid UTF-8 becomes U+FFFD.

        Args:
            ids: Token ids (a sequence or a 1-D tensor).

        Returns:
            The text.

        Raises:
            ValueError: For an id outside [0, vocab_size).
        """
        values = _checked_ids(ids, self.vocab_size, "the byte tokenizer")
        return bytes(i for i in values if i < 256).decode("utf-8", errors="replace")


def _checked_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int, what: str) -> list[int]:
    """``ids`` as a list; ``ValueError`` naming ``what`` for an id outside ``[0, vocab_size)``."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for i in values:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside {what}'s vocab [0, {vocab_size})")
    return values


HF_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
"""Special tokens `HFTokenizer` takes as BOS, first present wins (Llama 3, Llama 2 / Mistral, Gemma, ...)."""

HF_EOS_TOKENS = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")
"""Special tokens `HFTokenizer` takes as EOS, first present wins (Llama 3, Llama 2 / Mistral, Gemma, GPT-2)."""

HF_EXTRA_HINT = 'pip install "cp_dtensor[hf]"'


class HFTokenizer:
    """A HuggingFace `tokenizer.json` (the file torchtitan's `model.hf_assets_path` folder holds), loaded with
    the `tokenizers` library (the optional extra: `pip install "cp_dtensor[hf]"`).

    BOS and EOS are the tokenizer's own special tokens: the first of `HF_BOS_TOKENS` / `HF_EOS_TOKENS` it has
    (Llama 3: `<|begin_of_text|>` = 128000, `<|end_of_text|>` = 128001). A tokenizer with only one of the
    two uses that token for both (GPT-2's `<|endoftext|>`, as its HuggingFace config does); one with
    neither is refused. Text is encoded without the tokenizer's own post-processing (Llama 3's adds a BOS to
    every `encode`): the datasets add BOS/EOS per document themselves.

    Args:
        path: A `tokenizer.json` file, or a folder holding one.

    Attributes:
        name: The tokenizer.json path.
        BOS: Beginning-of-document id.
        EOS: End-of-document id.
        bos_token: BOS as text.
        eos_token: EOS as text.
        vocab_size: Largest id + 1, added (special) tokens included (Llama 3: 128,256).

    Raises:
        ValueError: The `tokenizers` library is missing (the message names the pip command), the file is not
            a tokenizer.json, or it has none of the BOS/EOS special tokens.
        FileNotFoundError: No such file (the message says where to get one).
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise ValueError(
                f"tokenizer {str(path)!r} is a HuggingFace tokenizer.json, which needs the tokenizers library: "
                f'{HF_EXTRA_HINT} (or use the "byte" tokenizer)'
            ) from None
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(file)!r} not found; put a HuggingFace tokenizer.json there (Llama 3: "
                f"hf download meta-llama/Llama-3.1-8B tokenizer.json --local-dir {str(file.parent)!r}, or "
                f"torchtitan's scripts/download_hf_assets.py --repo_id meta-llama/Llama-3.1-8B --assets "
                f'tokenizer), or use the "byte" tokenizer'
            )
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises plain Exception for a malformed file
            raise ValueError(
                f"tokenizer file {str(file)!r} is not a HuggingFace tokenizer.json ({err})"
            ) from None
        self.name = str(file)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        bos = next((t for t in HF_BOS_TOKENS if t in vocab), None)
        eos = next((t for t in HF_EOS_TOKENS if t in vocab), None)
        if bos is None and eos is None:
            raise ValueError(
                f"tokenizer {self.name!r} has no BOS or EOS special token (looked for {list(HF_BOS_TOKENS)} and "
                f"{list(HF_EOS_TOKENS)}); documents need one to mark their boundaries: add one as a special "
                f'token (tokenizers: Tokenizer.add_special_tokens) or use "byte"'
            )
        self.bos_token = bos if bos is not None else eos
        self.eos_token = eos if eos is not None else bos
        self.BOS = vocab[self.bos_token]
        self.EOS = vocab[self.eos_token]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text (special-token text inside it is encoded as such; no post-processing).

        Args:
            text: The text.
            bos: Prepend `BOS`.
            eos: Append `EOS`.

        Returns:
            Token ids.
        """
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` of each text, in parallel (the `tokenizers` library's own threads).

        Args:
            texts: The texts.
            bos: Prepend `BOS` to each.
            eos: Append `EOS` to each.

        Returns:
            Token ids per text.
        """
        head, tail = [self.BOS] if bos else [], [self.EOS] if eos else []
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [head + enc.ids + tail for enc in encodings]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids back to text; special tokens (BOS, EOS, ...) are dropped.

        Args:
            ids: Token ids (a sequence or a 1-D tensor).

        Returns:
            The text.

        Raises:
            ValueError: For an id outside [0, vocab_size).
        """
        values = _checked_ids(ids, self.vocab_size, f"tokenizer {self.name!r}")
        return self._tok.decode(values, skip_special_tokens=True)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """The tokenizer `spec` names: "byte" (`ByteTokenizer`) or a HuggingFace tokenizer.json (`HFTokenizer`).

    Args:
        spec: "byte", or the path of a `tokenizer.json` file or of a folder holding one.

    Returns:
        The tokenizer.

    Raises:
        ValueError: An empty spec, or what `HFTokenizer` raises (missing library, bad file, no BOS/EOS).
        FileNotFoundError: No tokenizer.json at the path.
    """
    if spec == "byte":
        return ByteTokenizer()
    if not str(spec).strip():
        raise ValueError(
            'tokenizer: got an empty string; use "byte" or the path of a HuggingFace tokenizer.json'
        )
    return HFTokenizer(spec)


# --------------------------------------------------------------------------------------------------------
# Text dataset
# --------------------------------------------------------------------------------------------------------


_TEXT_SUFFIXES = (".txt", ".jsonl")
_ENCODE_CHUNK = 1024  # documents per encode_batch call (bounds the tokenizer's temporary objects)


def _expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by `paths`; a directory stands for its `.txt` and `.jsonl` files (sorted)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ValueError("TextDataset needs at least one path to a .txt or .jsonl file; got an empty list")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"dataset file not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"dataset directory {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.suffix in _TEXT_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(
                f"unsupported dataset file {path}: expected a .txt (one document) or .jsonl (one document per "
                f"line) file"
            )
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"dataset file {path} is not valid UTF-8 ({err})") from err


def _read_documents(path: Path, text_field: str) -> list[str]:
    """Documents of one file: the whole `.txt` file, or the `text_field` of each JSONL line."""
    content = _read_text(path)
    if not content.strip():
        raise ValueError(f"dataset file {path} is empty (no text)")
    if path.suffix == ".txt":
        return [content]
    docs: list[str] = []
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: line is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or text_field not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}:{line_no}: JSON record has no field {text_field!r} (found {found}); "
                f"set text_field to the name of the text field"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{line_no}: field {text_field!r} must be a string, got {type(text).__name__}"
            )
        if text:
            docs.append(text)
    if not docs:
        raise ValueError(f"dataset file {path} has no text: every {text_field!r} field is empty")
    return docs


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the document id changes along the last dim.

    Args:
        document_ids: (..., S) integer ids; a document is a run of equal ids.

    Returns:
        (..., S) int64: each token's offset from the first token of its run.

    Example:
        >>> document_positions(torch.tensor([0, 0, 0, 1, 1, 2]))
        tensor([0, 1, 2, 0, 1, 0])
    """
    seq_len = document_ids.shape[-1]
    index = torch.arange(seq_len, device=document_ids.device).expand_as(document_ids)  # (..., S)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)  # (..., S)
    is_start[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    run_start = torch.where(is_start, index, 0).cummax(dim=-1).values  # (..., S) start of each token's run
    return index - run_start


class TextDataset:
    """Local `.txt` / `.jsonl` documents, tokenized and packed into fixed windows with their boundaries.

    Note [Packed documents]
    -----------------------
    Each document becomes `[BOS] + tokens + [EOS]`; documents are concatenated in file order into one stream,
    which is cut into windows of `seq_len + 1` tokens. Consecutive windows overlap by one token (window i
    starts at `i * seq_len`), so every token of the stream except the first is a label exactly once.
    Sample i is `tokens = window[:-1]`, `labels = window[1:]`. A document longer than what is left of a
    window continues in the next sample; nothing is dropped except the stream's last `(N - 1) % seq_len`
    labels, which do not fill a window. `document_ids` number the documents of a sample 0, 1, 2, ...
    along it (a continued document starts the next sample with id 0); with `reset_positions` the positions
    restart at 0 with each id (RoPE positions inside the document, as far as this sample holds it), else
    they are `arange(seq_len)`. seq_len 8, documents a (6 tokens with BOS/EOS), b (7), c, ...:

    ```
                        sample 0            sample 1
    tokens              B a a a a E B b  |  b b b b E B c c      (B = BOS, E = EOS)
    document_ids        0 0 0 0 0 0 1 1  |  0 0 0 0 0 1 1 1
    positions           0 1 2 3 4 5 6 7  |  0 1 2 3 4 5 6 7
    reset_positions     0 1 2 3 4 5 0 1  |  0 1 2 3 4 0 1 2
    ```

    The label of a document's EOS is the next document's BOS (as before document ids existed); a model
    with the `document_causal` mask predicts it from its own document, which ends there.

    Args:
        paths: A file, a directory (its `.txt` and `.jsonl` files, sorted) or a list of them. A `.txt` file is
            one document; a `.jsonl` file has one JSON object per line with the text in `text_field`
            (blank lines are skipped).
        seq_len: Tokens per sample.
        text_field: JSONL field holding the text.
        tokenizer: The tokenizer (its `BOS`/`EOS` wrap each document); None means `ByteTokenizer()`.
        reset_positions: Positions restart at 0 at each document start (see the Note).

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: Unsupported suffix, empty file or no text, invalid JSON line or missing field (file and
            line named), or fewer than `seq_len + 1` tokens in the whole corpus.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        seq_len: int,
        *,
        text_field: str = "text",
        tokenizer: Tokenizer | None = None,
        reset_positions: bool = False,
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.reset_positions = reset_positions
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.files = _expand_paths(paths)
        stream: list[int] = []
        starts: list[int] = []
        for path in self.files:
            docs = _read_documents(path, text_field)
            for first in range(0, len(docs), _ENCODE_CHUNK):
                for ids in self.tokenizer.encode_batch(
                    docs[first : first + _ENCODE_CHUNK], bos=True, eos=True
                ):
                    starts.append(len(stream))
                    stream.extend(ids)
        self.num_documents = len(starts)
        needed = seq_len + 1
        if len(stream) < needed:
            raise ValueError(
                f"corpus {[str(p) for p in self.files]} has {len(stream)} tokens ({self.tokenizer.name} tokenizer, "
                f"BOS/EOS included), but one sample of seq_len={seq_len} needs {needed}; add text or lower seq_len"
            )
        self.vocab_size = self.tokenizer.vocab_size
        dtype = torch.int16 if self.vocab_size <= 2**15 else torch.int32  # bytes (258 ids) fit in int16
        self.tokens = torch.tensor(stream, dtype=dtype)  # (N,)
        self.document_starts = torch.tensor(starts, dtype=torch.int64)  # (num_documents,) stream offsets

    @property
    def num_tokens(self) -> int:
        """Length of the packed token stream."""
        return self.tokens.numel()

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, index: int) -> Sample:
        """Sample `index`: the window starting at `index * seq_len` (Note [Packed documents]).

        Args:
            index: In [0, len(self)).

        Returns:
            `{"tokens", "labels", "positions", "document_ids"}`, each (seq_len,) int64.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a dataset of {len(self)} samples")
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1].to(torch.int64)  # (S + 1,)
        offsets = torch.arange(start, start + self.seq_len)  # (S,) stream offsets of the tokens
        document = torch.searchsorted(self.document_starts, offsets, right=True) - 1  # (S,) global index
        document_ids = document - document[0]  # (S,) 0, 1, 2, ... along the sample
        positions = (
            document_positions(document_ids)
            if self.reset_positions
            else torch.arange(self.seq_len, dtype=torch.int64)
        )  # (S,)
        return {
            "tokens": window[:-1],  # (S,)
            "labels": window[1:],  # (S,)
            "positions": positions,  # (S,)
            "document_ids": document_ids,  # (S,)
        }


# --------------------------------------------------------------------------------------------------------
# Synthetic long-range recall
# --------------------------------------------------------------------------------------------------------


class SyntheticRecallDataset:
    """Synthetic task whose answers sit far from their cues: solvable only by attending across the sequence.

    Note [Synthetic recall sample]
    ------------------------------
    Token ids are split into disjoint ranges below `vocab_size`:
    `filler [0, F) | keys [F, F+K) | values [F+K, F+K+V') | query marker F+K+V'`.
    The cue sits inside the cue region, `int(cue_fraction * seq_len)` positions from `cue_start =
    int(cue_start_fraction * seq_len)` on (the first 10% by default), each cue written `cue_repeats` times at
    random distinct places; random filler fills everything else up to one query marker, after which the last
    `num_queries` positions are the queries. Only query positions have labels (the recalled value); all
    other labels are -100. The answer is never in the input at or after a query, so the task is the same for
    causal and bidirectional models, and it needs attention from the queries back to the cue region (~90% of
    the sequence by default). Under context parallelism it crosses ranks only if the cue region lies on
    another CP rank than the queries: with the zigzag layout the first chunk belongs to the rank that holds
    the last one, so the trainer starts the cue region at `cue_start_fraction = 0.25` (Note [Recall across
    CP ranks] in `cp_dtensor/trainer.py`).

    `variant="copy"` (default; one hop, K = 0, V' = num_values): one value, the queries are query markers.

    ```
    position  0 ... cue_start ...       cue_end             ...        S-Q-1   S-Q  ...  S-1
    tokens    f ... f  v  f  f  v  f  v  f | f  f  f  f  f  f  ...  f  f   ?       ?    ...  ?
    labels    . ... .  .  .  .  .  .  .  . | .  .  .  .  .  .  ...  .  .   .       v    ...  v
    ```

    `variant="keyed"` (one hop, several answers): `num_pairs` distinct keys, each key k owning its own value
    sub-range of `num_values` ids (V' = K * num_values); the cue holds one value of each chosen key, the
    queries are keys (distinct, random order) labelled with their key's value.

    ```
    tokens    f  v2 f  v1 v2 f  v1 f | f  f  ...  f  ?   k1   k2
    labels    .  .  .  .  .  .  .  . | .  .  ...  .  .   v1   v2        (v1 from k1's sub-range, ...)
    ```

    `variant="pairs"` (associative recall, two hops): the cue holds adjacent (key, value) pairs with values
    drawn from one shared range (V' = num_values); a query key is labelled with the value that followed it.
    Solving it needs an induction circuit (a previous-token head, then a content match), which a 2-layer
    model learns far more slowly than the one-hop variants.

    ```
    tokens    f  k1 v1 f  k2 v2 k1 v1 | f  f  ...  f  ?   k2   k1
    labels    .  .  .  .  .  .  .  .  | .  .  ...  .  .   v2   v1
    (f filler, k key, v value, ? query marker, . = -100, | = cue_end)
    ```

    Sample i is a pure function of (seed, i) and the constructor arguments. `chance_loss = ln(num_values)`
    is the loss of a uniform guess among the possible answers, i.e. what a model reaches without long-range
    attention.

    `documents` sets the sample's `document_ids` (tokens, labels and positions do not depend on it):
    `"same"` (default) makes the sample one document (all ids 0); `"split"` makes it two, cut at `cue_end`
    (`split_position`): document 0 holds the cue region, document 1 the filler after it, the query marker
    and the queries. Under a `document_causal` mask the queries then cannot see their cue, so a model stays
    at `chance_loss`: the control of a cross-document recall experiment.

    ```
    tokens          f ... f  v  f  v  f  v | f  f  ...  f  ?   ?  ...  ?
    document_ids    0 ... 0  0  0  0  0  0 | 1  1  ...  1  1   1  ...  1      ("split"; | = cue_end)
    ```

    Measured (debug flavor, single process, 1 CPU thread, AdamW lr 1e-3, grad clip 1, seq_len 256, global
    batch 8, default arguments otherwise; loss = mean over the 10 previous steps, chance = ln 16 = 2.77):

    | variant | step 50 | step 100 | step 150 | step 300 | time to step 150 |
    |---------|---------|----------|----------|----------|------------------|
    | copy    | 3.25    | 2.25     | 0.19     |          | 12 s             |
    | keyed   | 3.84    | 3.08     | 2.67     | 0.63     | 13 s             |
    | pairs   |         | 2.85     |          | 2.76     | 14 s             |

    (copy, seeds 0/1/2: 0.19 / 0.05 / 0.09 at step 150.) Only "copy" meets "< 50% of chance in 150 steps";
    "pairs" stays at chance for 300 steps with the 2-layer debug model.

    Args:
        seq_len: Tokens per sample.
        vocab_size: Model vocabulary size; all ranges must fit below it.
        seed: Dataset seed.
        variant: "copy", "keyed" or "pairs" (see the Note).
        num_pairs: Number of cues per sample ("keyed", "pairs"; None means 4; "copy" has exactly 1).
        num_queries: Query positions at the end of each sample ("keyed", "pairs": at most `num_pairs`).
        num_keys: Size of the key range ("copy" has none; None means `num_pairs` for "keyed", 16 for
            "pairs").
        num_values: Possible answers per query (sets `chance_loss`).
        num_filler: Size of the filler range; None takes the ids left below `vocab_size`, at most 256.
        cue_fraction: The cue region is `int(cue_fraction * seq_len)` positions long.
        cue_start_fraction: The cue region starts at position `int(cue_start_fraction * seq_len)` (0: the
            first positions, as before this option existed).
        cue_repeats: How many times each cue is written (more copies make the task easier to learn); None means
            4 for "copy" and "keyed", 1 for "pairs".
        num_samples: `len(self)`; samples are generated on demand, nothing is stored.
        documents: "same" (one document per sample) or "split" (cue and queries in two documents); see above.
        reset_positions: Positions restart at 0 at each document start (the second "split" document's
            positions count from `cue_end`); else `arange(seq_len)`.

    Raises:
        ValueError: For an unknown variant or `documents`, ranges that do not fit in `vocab_size`, or a
            `seq_len` too short for the cue region (from its start), the query marker and the queries.
    """

    VARIANTS = ("copy", "keyed", "pairs")
    DOCUMENTS = ("same", "split")

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        seed: int = 0,
        *,
        variant: str = "copy",
        num_pairs: int | None = None,
        num_queries: int = 4,
        num_keys: int | None = None,
        num_values: int = 16,
        num_filler: int | None = None,
        cue_fraction: float = 0.1,
        cue_start_fraction: float = 0.0,
        cue_repeats: int | None = None,
        num_samples: int = 1 << 20,
        documents: str = "same",
        reset_positions: bool = False,
    ) -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        if documents not in self.DOCUMENTS:
            raise ValueError(
                f"SyntheticRecallDataset: documents must be one of {self.DOCUMENTS}, got {documents!r}"
            )
        if variant == "copy":
            if num_pairs not in (None, 1) or num_keys not in (None, 0):
                raise ValueError(
                    f"variant 'copy' has one cue and no keys; got num_pairs={num_pairs}, num_keys={num_keys} "
                    f"(use variant 'keyed' or 'pairs' for several cues)"
                )
            num_pairs, num_keys = 1, 0
        else:
            num_pairs = 4 if num_pairs is None else num_pairs
            if num_keys is None:
                num_keys = num_pairs if variant == "keyed" else 16
        if cue_repeats is None:
            cue_repeats = 1 if variant == "pairs" else 4
        for name, value in (
            ("seq_len", seq_len),
            ("num_pairs", num_pairs),
            ("num_queries", num_queries),
            ("num_values", num_values),
            ("cue_repeats", cue_repeats),
            ("num_samples", num_samples),
        ):
            if value <= 0:
                raise ValueError(f"SyntheticRecallDataset: {name} must be positive, got {value}")
        if variant != "copy":
            if num_pairs > num_keys:
                raise ValueError(
                    f"num_pairs={num_pairs} needs as many distinct keys, but num_keys={num_keys}"
                )
            if num_queries > num_pairs:
                raise ValueError(
                    f"num_queries={num_queries} must be <= num_pairs={num_pairs} (one query per cue)"
                )
        value_ids = num_keys * num_values if variant == "keyed" else num_values
        special = num_keys + value_ids + 1
        if num_filler is None:
            num_filler = min(256, vocab_size - special)
        if num_filler <= 0 or num_filler + special > vocab_size:
            raise ValueError(
                f"token ranges do not fit: num_filler={num_filler} + {num_keys} keys + {value_ids} value ids + "
                f"1 query marker = {num_filler + special} > vocab_size={vocab_size}; raise vocab_size or shrink "
                f"the ranges"
            )
        if not 0.0 <= cue_start_fraction < 1.0:
            raise ValueError(
                f"SyntheticRecallDataset: cue_start_fraction must be in [0, 1), got {cue_start_fraction}"
            )
        cue_start = int(cue_start_fraction * seq_len)
        cue_len = int(cue_fraction * seq_len)
        cue_end = cue_start + cue_len
        cue_width = 2 if variant == "pairs" else 1  # positions one written cue takes
        needed = num_pairs * cue_repeats * cue_width
        if cue_len < needed:
            raise ValueError(
                f"the cue region ({cue_len} positions = cue_fraction {cue_fraction} x seq_len {seq_len}) "
                f"cannot hold {num_pairs} cue(s) x {cue_repeats} repeats x {cue_width} positions = {needed}; "
                f"raise seq_len or cue_fraction, or lower num_pairs or cue_repeats"
            )
        if cue_end + 1 + num_queries > seq_len:
            raise ValueError(
                f"seq_len={seq_len} is too short for the cue region (positions {cue_start}..{cue_end - 1}), "
                f"1 query marker and {num_queries} queries; use seq_len >= {cue_end + 1 + num_queries} or a "
                f"smaller cue_start_fraction"
            )
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.variant = variant
        self.num_pairs = num_pairs
        self.num_queries = num_queries
        self.num_values = num_values
        self.cue_repeats = cue_repeats
        self.cue_start = cue_start
        self.cue_end = cue_end
        self.num_samples = num_samples
        self.documents = documents
        self.reset_positions = reset_positions
        self.filler_range = (0, num_filler)
        self.key_range = (num_filler, num_filler + num_keys)
        self.value_range = (num_filler + num_keys, num_filler + num_keys + value_ids)
        self.query_marker = num_filler + num_keys + value_ids

    @property
    def chance_loss(self) -> float:
        """ln(num_values): the loss of a uniform guess among the possible answers of a query."""
        return math.log(self.num_values)

    @property
    def split_position(self) -> int | None:
        """First position of the second document for `documents="split"` (`cue_end`); None for "same"."""
        return self.cue_end if self.documents == "split" else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        """Sample `index` (a pure function of seed and index).

        Args:
            index: In [0, len(self)).

        Returns:
            `{"tokens", "labels", "positions", "document_ids"}`, each (seq_len,) int64.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range for a dataset of {self.num_samples} samples")
        gen = torch.Generator().manual_seed(_mix_seed("synthetic-recall", self.seed, index))
        seq, p, q, r = self.seq_len, self.num_pairs, self.num_queries, self.cue_repeats
        k_lo, k_hi = self.key_range
        v_lo = self.value_range[0]
        tokens = torch.randint(*self.filler_range, (seq,), generator=gen)  # (S,)
        labels = torch.full((seq,), IGNORE_INDEX, dtype=torch.int64)  # (S,)

        if self.variant == "copy":
            keys = torch.full((1,), self.query_marker, dtype=torch.int64)  # (1,) the query is the marker
        else:
            keys = k_lo + torch.randperm(k_hi - k_lo, generator=gen)[:p]  # (P,) distinct keys
        values = v_lo + torch.randint(0, self.num_values, (p,), generator=gen)  # (P,)
        if self.variant == "keyed":
            values += (keys - k_lo) * self.num_values  # each key's own sub-range

        if self.variant == "pairs":
            cue_len = self.cue_end - self.cue_start
            slots = (
                self.cue_start + 2 * torch.randperm(cue_len // 2, generator=gen)[: p * r]
            )  # (P*R,) even offsets
            tokens[slots] = keys.repeat(r)
            tokens[slots + 1] = values.repeat(r)
        else:
            slots = (
                self.cue_start + torch.randperm(self.cue_end - self.cue_start, generator=gen)[: p * r]
            )  # (P*R,)
            tokens[slots] = values.repeat(r)

        query_start = seq - q
        tokens[query_start - 1] = self.query_marker
        if self.variant == "copy":
            asked = torch.zeros(q, dtype=torch.int64)  # (Q,) every query asks the one cue
        else:
            asked = torch.randperm(p, generator=gen)[:q]  # (Q,) distinct cues in random order
        tokens[query_start:] = keys[asked]  # (Q,)
        labels[query_start:] = values[asked]  # (Q,)
        document_ids = torch.zeros(seq, dtype=torch.int64)  # (S,)
        if self.split_position is not None:
            document_ids[self.split_position :] = 1
        positions = (
            document_positions(document_ids) if self.reset_positions else torch.arange(seq, dtype=torch.int64)
        )  # (S,)
        return {"tokens": tokens, "labels": labels, "positions": positions, "document_ids": document_ids}


# --------------------------------------------------------------------------------------------------------
# Global batches
# --------------------------------------------------------------------------------------------------------


class MapDataset(Protocol):
    """What `GlobalBatchLoader` needs: `len()` and samples by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class GlobalBatchLoader:
    """Deterministic global batches: batch k depends only on (dataset, seed, k).

    The sample slots of batch k are `k * G ... (k + 1) * G - 1` of an endless stream that visits the dataset
    epoch after epoch; slot j reads sample `perm_e[j % N]` with `e = j // N` and `perm_e` a permutation seeded
    by (seed, e) (identity when `shuffle=False`). A batch may straddle two epochs. The loader is an endless
    iterator; `state_dict()` holds the number of batches consumed.

    Args:
        dataset: Map-style dataset of `{"tokens", "labels", "positions"}` samples (plus any other (S,)
            entries, e.g. `document_ids`, the same names in every sample).
        global_batch_size: Samples per global batch (all data-parallel ranks together).
        seed: Shuffling seed.
        shuffle: Shuffle sample indices each epoch.
    """

    def __init__(
        self, dataset: MapDataset, global_batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if len(dataset) <= 0:
            raise ValueError("GlobalBatchLoader got an empty dataset")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_consumed = 0
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(_mix_seed("loader-epoch", self.seed, epoch))
            self._perm_cache = (epoch, torch.randperm(len(self.dataset), generator=gen))
        return self._perm_cache[1]

    def sample_indices(self, batch_index: int) -> list[int]:
        """Dataset indices of the samples of global batch `batch_index`, in row order.

        Args:
            batch_index: Non-negative batch number.

        Returns:
            `global_batch_size` dataset indices.
        """
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        n = len(self.dataset)
        indices = []
        for slot in range(batch_index * self.global_batch_size, (batch_index + 1) * self.global_batch_size):
            epoch, within = divmod(slot, n)
            indices.append(int(self._epoch_permutation(epoch)[within]) if self.shuffle else within)
        return indices

    def get_batch(self, batch_index: int) -> Sample:
        """Global batch `batch_index` (does not move the iterator).

        Args:
            batch_index: Non-negative batch number.

        Returns:
            The samples' entries stacked (`tokens`, `labels`, `positions`, and `document_ids` where the
            dataset has them), each (G, S) int64.

        Raises:
            ValueError: The samples of the batch do not have the same entries.
        """
        indices = self.sample_indices(batch_index)
        samples = [self.dataset[i] for i in indices]
        keys = list(samples[0])
        for index, sample in zip(indices, samples):
            if set(sample) != set(keys):
                raise ValueError(
                    f"dataset samples disagree on their entries: sample {indices[0]} has {sorted(keys)}, sample "
                    f"{index} has {sorted(sample)}; a dataset must return the same entries for every index"
                )
        return {key: torch.stack([s[key] for s in samples]) for key in keys}

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        batch = self.get_batch(self.batches_consumed)
        self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Loader position and the settings it depends on.

        Returns:
            `{"batches_consumed", "seed", "global_batch_size", "num_samples", "shuffle"}`.
        """
        return {
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": len(self.dataset),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position.

        Args:
            state: From `state_dict()`.

        Raises:
            ValueError: The saved seed, batch size, dataset length or shuffle flag differ from this loader's
                (the batch numbering would then mean different data).
        """
        current = self.state_dict()
        for key in ("seed", "global_batch_size", "num_samples", "shuffle"):
            if key in state and state[key] != current[key]:
                raise ValueError(
                    f"cannot resume data loader: checkpoint has {key}={state[key]!r} but this loader has "
                    f"{key}={current[key]!r}; use the same data settings as the checkpointed run"
                )
        consumed = int(state["batches_consumed"])
        if consumed < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {consumed}")
        self.batches_consumed = consumed


def validate_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Check that every id is in [0, vocab_size) (an out-of-range id crashes or corrupts the embedding).

    Args:
        tokens: Integer tensor of any shape.
        vocab_size: The model's vocabulary size.

    Raises:
        ValueError: Naming the first bad id and the vocab size.
    """
    if tokens.numel() == 0:
        return
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        first = int(tokens[bad].flatten()[0])
        raise ValueError(
            f"token id {first} is outside [0, {vocab_size}) (vocab_size={vocab_size}); use a model vocab_size "
            f"> {int(tokens.max())} or fix the data"
        )
