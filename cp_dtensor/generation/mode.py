"""The torch-function mode that routes a model's attention calls to the prefill or to the sharded KV cache.

Note [Generation mode]
~~~~~~~~~~~~~~~~~~~~~~
Generation runs the model unchanged; its attention calls (``F.scaled_dot_product_attention`` or
``cp_dtensor.document_attention``, in layer order) reach this mode, which counts them to know the layer::

    prefill (prompt shards, layout order)          decode (one new token, replicated on every rank)
      store this rank's K/V rows in the cache        the owner rank appends the token's K/V
      CP attention of the shards: the same one call  partial attention over the local cache (fp32)
      as training (cp_dtensor.attention.api.attend,   + one all-gather of (out, lse), merged by
      forward only: nothing is saved)                 log-sum-exp (Note [Sharded KV cache])

The mask of the prefill is the mode's (document ids that keep padding out), not the model's: a model whose
layers use sliding windows is refused (the decode step would need the window too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cp_dtensor.attention.api import attend
from cp_dtensor.attention.functional import document_attention
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.generation.kv_cache import ShardedKVCache, decode_attention, merge_partials

__all__ = ["GenerationAttention"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class GenerationAttention(TorchFunctionMode):
    """Attention of a generating model: prefill into, or decode against, a :class:`ShardedKVCache`.

    Args:
        cache: this rank's cache.
        settings: CP settings of the prefill (layout of the prompt shards, strategy, backend).
        mask: the prefill's mask over the padded prompt (documents keep padding out).
        prefill_valid: (B, S_local) which of this rank's prompt rows are tokens (the rest is padding).
    """

    def __init__(
        self, cache: ShardedKVCache, settings: CPSettings, mask: AttentionMask, prefill_valid: torch.Tensor
    ) -> None:
        super().__init__()
        self.cache = cache
        self.settings = settings
        self.mask = mask
        self.prefill_valid = prefill_valid
        self.decoding = False
        self.owner = False
        self.layer = 0

    def start(self, *, decoding: bool, owner: bool = False) -> GenerationAttention:
        """Prepare one forward: the prefill, or a decode step (``owner``: this rank stores the new token)."""
        self.decoding, self.owner, self.layer = decoding, owner, 0
        return self

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = dict(zip(_SDPA_ARGS, args)) | kwargs
            if call.get("attn_mask") is not None or call.get("dropout_p", 0.0):
                raise ValueError("generation serves causal self-attention without attn_mask or dropout.")
            q, k, v, scale = call["query"], call["key"], call["value"], call.get("scale")
            if not call.get("is_causal", False):
                raise ValueError("generation needs a causal (decoder) model.")
            return self._attend(q, k, v, scale)
        if func is document_attention:
            q, k, v = args[:3]
            if tuple(kwargs.get("window_size", (-1, -1))) != (-1, -1):
                raise ValueError(
                    "generation with a sliding-window model is not supported yet: the decode step attends to the "
                    "whole cache."
                )
            if not kwargs.get("is_causal", True):
                raise ValueError("generation needs a causal (decoder) model.")
            return self._attend(q, k, v, kwargs.get("scale"))
        return func(*args, **kwargs)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        layer = self.cache.layer(self.layer, k)
        self.layer += 1
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if not self.decoding:
            layer.append(k, v, self.prefill_valid)
            return attend(q, k, v, self.cache.group, settings=self.settings, mask=self.mask, scale=scale)
        if self.owner:
            layer.append(k, v, torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device))
        out, lse = decode_attention(q, layer, scale)
        merged = merge_partials(out, lse, self.cache.group)  # (B, Hq, D) fp32, identical on every rank
        return merged.to(q.dtype).unsqueeze(2)  # (B, Hq, 1, D)

    @property
    def cp(self) -> int:
        """CP ranks sharing the cache."""
        return 1 if self.cache.group is None else dist.get_world_size(self.cache.group)
