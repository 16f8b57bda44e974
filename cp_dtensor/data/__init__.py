"""Data: tokenizers (bytes, or a HuggingFace tokenizer.json), local text datasets of packed documents, a
synthetic long-range recall task, a global batch loader.

Modules: :mod:`~cp_dtensor.data.tokenizer` (``ByteTokenizer``, ``HFTokenizer``, ``load_tokenizer``),
:mod:`~cp_dtensor.data.text` (``TextDataset``), :mod:`~cp_dtensor.data.sft` (``SFTDataset``: loss-masked
prompt/completion records), :mod:`~cp_dtensor.data.recall` (``SyntheticRecallDataset``),
:mod:`~cp_dtensor.data.loader` (``GlobalBatchLoader``) and :mod:`~cp_dtensor.data.common` (the sample
format and the helpers they share).

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

from cp_dtensor.data.common import (
    IGNORE_INDEX,
    RECALL_CUE_START_FRACTION,
    Sample,
    document_positions,
    validate_token_ids,
)
from cp_dtensor.data.loader import GlobalBatchLoader, MapDataset
from cp_dtensor.data.packing import PackedTokenDataset, TokenStream, pack_window
from cp_dtensor.data.recall import SyntheticRecallDataset
from cp_dtensor.data.sft import SFTDataset
from cp_dtensor.data.text import TextDataset
from cp_dtensor.data.token_cache import TokenCache, build_token_cache
from cp_dtensor.data.tokenizer import (
    HF_BOS_TOKENS,
    HF_EOS_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "HF_BOS_TOKENS",
    "HF_EOS_TOKENS",
    "IGNORE_INDEX",
    "RECALL_CUE_START_FRACTION",
    "ByteTokenizer",
    "GlobalBatchLoader",
    "HFTokenizer",
    "MapDataset",
    "PackedTokenDataset",
    "SFTDataset",
    "Sample",
    "SyntheticRecallDataset",
    "TextDataset",
    "TokenCache",
    "TokenStream",
    "Tokenizer",
    "build_token_cache",
    "document_positions",
    "load_tokenizer",
    "pack_window",
    "validate_token_ids",
]
