"""torchtitan's ``block_causal`` document masking, served by cp_dtensor's document attention (CP or not).

Note [block_causal with cp_dtensor]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torchtitan 0.2.x packs documents into rows and keeps attention inside them with the flavors whose
``attn_mask_type`` is ``"block_causal"`` (``debugmodel_flex_attn``, ``8B_flex``: FlexAttention;
``debugmodel_varlen_attn``, ``8B_varlen``: varlen). Either way the documents come from EOS tokens of the
*whole* rows, found by the trainer before any CP sharding::

    Trainer.post_dataloading_process(input_dict, labels)              torchtitan/train.py
      model.get_attention_masks(inputs (B, S), tokenizer)             document of token i = number of EOS
        flex: BlockMask(causal & same document)                       tokens before i (get_document_mask_mod)
        varlen: cu_seqlens at every EOS + 1
      CP: prepare_context_parallel_input -> cp_shard                  takes a FlexAttention BlockMask only

On CPU neither kernel trains (FlexAttention has no CPU backward, varlen no CPU kernel), torchtitan's own CP
takes FlexAttention only, and varlen refuses CP. The train spec serves these flavors with
:func:`cp_dtensor.document_attention` instead, on one process and under CP alike::

    SeededLlama3 (a block_causal flavor)
      get_attention_masks(inputs, tokenizer)  -> document_ids (B, S) int32 = eos_document_ids(inputs, eos_id)
      layers.i.attention                      DocumentCausalLlamaAttention: torchtitan's wq/wk/wv, RoPE at
                                              `positions`, wo; attention_masks = the document ids
        inner_attention                       DocumentCausalAttention: document_attention(q, k, v,
                                              document_ids, positions)   cp=1: the exact masked op
    under CP (cp_dtensor's Trainer, one method changed):
      post_dataloading_process                the ids from the whole rows (as above), then torchtitan's
                                              prepare_context_parallel_input for tokens, labels, positions
                                              ("headtail" = zigzag); the ids go to the model unsharded
      ContextParallel style on inner_attention   document_attention -> the masked ring (exact), the
                                              positions checked against the layout

The zigzag layout is exact with documents, but it balances the causal triangle, not the documents: ranks
may get unequal attention work. cp_dtensor's balanced layout would even it out, but torchtitan shards the
batch itself with a fixed load balancer ("headtail" or none), so the layout is zigzag or contiguous.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchtitan.models.llama3.model import model as tt_model

from cp_dtensor.attention.functional import document_attention

__all__ = [
    "DocumentCausalAttention",
    "DocumentCausalLlamaAttention",
    "apply_document_attention",
    "eos_document_ids",
    "uses_document_ids",
]

DOCUMENT_MASK_TYPE = "block_causal"
"""torchtitan's ``attn_mask_type`` of packed documents found by EOS tokens."""


def uses_document_ids(model_args: Any) -> bool:
    """Whether torchtitan model args ask for ``block_causal`` masking (served by document attention)."""
    return getattr(model_args, "attn_mask_type", "causal") == DOCUMENT_MASK_TYPE


def eos_document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document ids of packed rows, exactly as torchtitan's ``get_document_mask_mod`` numbers them.

    A document ends with its EOS token: the id of token i is the number of EOS tokens before i, so an EOS
    belongs to the document it closes and the next token starts a new one::

        tokens        a a E b b b E c
        document_ids  0 0 0 1 1 1 1 2

    Args:
        tokens: (B, S) token ids of whole rows (not a CP shard).
        eos_id: the tokenizer's EOS id.

    Returns:
        (B, S) int32 document ids, natural order.
    """
    eos = (tokens == eos_id).to(torch.int32)  # (B, S)
    document_ids = torch.zeros_like(eos)  # (B, S)
    document_ids[:, 1:] = eos.cumsum(dim=1, dtype=torch.int32)[:, :-1]
    return document_ids


class DocumentCausalAttention(nn.Module):
    """torchtitan's ``inner_attention`` for ``block_causal``: one :func:`cp_dtensor.document_attention` call.

    Without CP this is the exact document-causal attention on one process; under the
    :class:`~cp_dtensor.ContextParallel` style (applied to this module) it is the masked ring.
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        document_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Causal attention inside each document.

        Args:
            q: (B, Hq, S, D) queries (under CP: this rank's shard); Hq a multiple of Hkv.
            k: (B, Hkv, S, D) keys.
            v: (B, Hkv, S, D) values.
            document_ids: (B, S_global) document ids of the whole rows, natural order.
            positions: (B, S) global positions of q's tokens (under CP: checked against the layout).
            scale: softmax scale; default ``1 / sqrt(D)``.

        Returns:
            (B, Hq, S, D) attention output.
        """
        return document_attention(
            q, k, v, document_ids=document_ids, is_causal=True, scale=scale, positions=positions
        )


class DocumentCausalLlamaAttention(tt_model.Attention):
    """torchtitan's Llama 3 ``Attention`` whose ``attention_masks`` are document ids (B, S_global).

    The same projections, RoPE and output as torchtitan's forward; the attention is
    ``inner_attention`` (a :class:`DocumentCausalAttention`) with the document ids and the positions.
    """

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        attention_masks: Any,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention inside each packed document.

        Args:
            x: (B, S, dim) hidden states (under CP: this rank's shard).
            freqs_cis: torchtitan's RoPE table.
            attention_masks: (B, S_global) int document ids of the whole rows, from
                ``get_attention_masks`` (:func:`eos_document_ids`).
            positions: (B, S) global positions of x's tokens; None: ``arange(S)``.

        Returns:
            (B, S, dim) the attention block's output.

        Raises:
            ValueError: ``attention_masks`` is not a (B, S) document id tensor.
        """
        if not isinstance(attention_masks, torch.Tensor) or attention_masks.dim() != 2:
            raise ValueError(
                f"block_causal attention with cp_dtensor takes the (B, S) document ids of "
                f"model.get_attention_masks(inputs, tokenizer) as attention_masks, got "
                f"{type(attention_masks).__name__}."
            )
        bs, seqlen, _ = x.shape
        # -1: the local heads (TP may shard the projections), as in torchtitan's forward
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)  # (B, S, Hq, D)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)  # (B, S, Hkv, D)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)  # (B, S, Hkv, D)
        xq, xk = tt_model.apply_rotary_emb(xq, xk, freqs_cis=freqs_cis, positions=positions)
        output = self.inner_attention(
            xq.transpose(1, 2),  # (B, Hq, S, D)
            xk.transpose(1, 2),  # (B, Hkv, S, D)
            xv.transpose(1, 2),  # (B, Hkv, S, D)
            document_ids=attention_masks,
            positions=positions,
        )  # (B, Hq, S, D)
        output = output.transpose(1, 2).reshape(bs, seqlen, -1)  # (B, S, Hq * D)
        return self.wo(output)


def apply_document_attention(model: nn.Module) -> None:
    """Serve a ``block_causal`` torchtitan Llama 3 with cp_dtensor's document attention (in place).

    Every layer's ``attention`` becomes a :class:`DocumentCausalLlamaAttention` (the same parameters) and its
    ``inner_attention`` a :class:`DocumentCausalAttention`, replacing torchtitan's FlexAttention or varlen
    wrapper. Call it right after construction, before any parallelism.
    """
    for block in model.layers.values():
        attention = block.attention
        # Swap the class (it adds no state) rather than re-running torchtitan's constructor.
        attention.__class__ = DocumentCausalLlamaAttention
        attention.inner_attention = DocumentCausalAttention()
