"""Tokenizers of the "text" dataset: UTF-8 bytes, or a HuggingFace tokenizer.json."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "HF_BOS_TOKENS",
    "HF_EOS_TOKENS",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "encode_flat",
    "load_tokenizer",
    "tokenizer_fingerprint",
]


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

    def encode_batch_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text without BOS/EOS, through the library's fastest batch encoder (no offsets).

        Args:
            texts: The texts.

        Returns:
            Token ids per text.
        """
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # tokenizers >= 0.20
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]

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


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """What identifies a tokenizer's output: its kind, vocabulary size, BOS/EOS and (for a tokenizer.json) a
    digest of the file, so that a token cache built with another tokenizer is never reused."""
    text = f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:{tokenizer.BOS}:{tokenizer.EOS}"
    if isinstance(tokenizer, HFTokenizer):
        text += ":" + hashlib.sha256(Path(tokenizer.name).read_bytes()).hexdigest()
    return text


def encode_flat(
    tokenizer: Tokenizer, texts: Sequence[str], *, bos: bool, eos: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Encode texts into one flat id array (the pre-tokenizer's hot path).

    The byte tokenizer and HF tokenizers take a vectorized path (one buffer of UTF-8 bytes; the `tokenizers`
    library's multi-threaded batch encoder); any other tokenizer goes through its ``encode_batch``.

    Args:
        tokenizer: The tokenizer.
        texts: The texts.
        bos: Prepend ``BOS`` to each text's ids.
        eos: Append ``EOS`` to each text's ids.

    Returns:
        ``(ids, lengths)``: (N,) int64 ids of all texts one after the other, and (len(texts),) int64 ids
        per text (BOS/EOS included).
    """
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if isinstance(tokenizer, ByteTokenizer):
        encoded = [text.encode("utf-8") for text in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ids = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64)
        starts = np.cumsum(lengths) - lengths  # (T,) offset of each text in ids
        where, values = [], []
        if bos:
            where.append(starts)
            values.append(np.full(len(texts), tokenizer.BOS))
        if eos:
            where.append(starts + lengths)
            values.append(np.full(len(texts), tokenizer.EOS))
        if where:  # interleave per text (BOS_i before EOS_i, EOS_i before BOS_{i+1}); np.insert is stable
            order = np.stack(where, axis=1).reshape(-1)
            ids = np.insert(ids, order, np.stack(values, axis=1).reshape(-1))
        return ids, lengths + int(bos) + int(eos)
    if isinstance(tokenizer, HFTokenizer):
        batch = tokenizer.encode_batch_ids(texts)
    else:
        batch = tokenizer.encode_batch(texts)
    head, tail = [tokenizer.BOS] if bos else [], [tokenizer.EOS] if eos else []
    lists = [head + list(ids) + tail for ids in batch]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    ids = np.fromiter((i for ids in lists for i in ids), dtype=np.int64, count=int(lengths.sum()))
    return ids, lengths
