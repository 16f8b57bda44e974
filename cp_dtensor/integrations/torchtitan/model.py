"""torchtitan's Llama 3 for both trainers: degree-independent init, and cp_dtensor's model interface.

Note [Seeded init of torchtitan's Llama 3]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
DTensor's RNG supports CUDA-like devices only: on CPU torchtitan's init gives every FSDP shard the same
random numbers (shard 0 == shard 1), so a cp=2 run would start from other weights than a cp=1 run.
:class:`SeededLlama3` draws each parameter whole from its own generator and keeps the local shard, whenever
``debug.seed`` is set, on any device::

    seed, "layers.0.attention.wq.weight" -> blake2b -> Generator -> full (out, in) fp32, torchtitan's law
                                                                      |  distribute_tensor(placements)
                                                         rank 0: rows [0, out/2)   rank 1: rows [out/2, out)

Note [torchtitan's Llama 3 in cp_dtensor's trainer]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
:class:`TorchtitanLlama3` is torchtitan's ``Transformer`` with the forward signatures of cp_dtensor's
model, so :func:`cp_dtensor.parallelize.build_parallel_model` and cp_dtensor's trainer
(``[model] name = "torchtitan.llama3"``) drive it like their own model::

    cp_dtensor trainer -> TorchtitanLlama3 (torchtitan's modules and parameter names, unchanged)
      forward(tokens, positions)     rope = freqs_cis[positions]  (S_local, head_dim / 2) complex64
        block(x, rope)               x + attention(attention_norm(x), rope); + feed_forward(ffn_norm(h))
          attention(x, rope)         torchtitan's Attention.forward(x, rope, attention_masks=None)
            attention.sdpa           = attention.inner_attention: cp_dtensor's CP style goes here
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig as TorchtitanJobConfig
from torchtitan.models import llama3 as tt_llama3
from torchtitan.models.llama3.model import model as tt_model
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.tools.logging import logger

from cp_dtensor.integrations.torchtitan.documents import (
    apply_document_attention,
    eos_document_ids,
    uses_document_ids,
)
from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.rope import RopeScaling

__all__ = [
    "Llama3Args",
    "SeededLlama3",
    "TorchtitanLlama3",
    "build_torchtitan_llama3",
    "build_torchtitan_llama3_from_args",
    "llama3_args",
    "torchtitan_llama3_args",
    "torchtitan_llama3_flavors",
]


@dataclasses.dataclass
class Llama3Args(tt_llama3.TransformerModelArgs):
    """torchtitan's Llama 3 args plus the init seed, taken from ``debug.seed`` by ``update_from_config``."""

    init_seed: int | None = None
    """Seed of :meth:`SeededLlama3.init_weights`; None keeps torchtitan's own (global RNG) init."""

    def update_from_config(self, job_config: TorchtitanJobConfig, **kwargs: Any) -> None:
        """torchtitan's update (max_seq_len from training.seq_len), then ``init_seed = debug.seed``.

        For ``block_causal`` flavors torchtitan's refusal of varlen under CP is skipped: cp_dtensor's
        document attention replaces the varlen kernel (Note [block_causal with cp_dtensor]).
        """
        if uses_document_ids(self):  # torchtitan's update without that refusal
            seq_len = job_config.training.seq_len
            if seq_len > self.max_seq_len:
                logger.warning(f"Sequence length {seq_len} exceeds original maximum {self.max_seq_len}.")
            self.max_seq_len = seq_len
        else:
            super().update_from_config(job_config, **kwargs)
        self.init_seed = job_config.debug.seed


def llama3_args(flavor: str, **changes: Any) -> Llama3Args:
    """A fresh copy of torchtitan's ``flavor`` args (its table is shared and its trainer mutates entries)."""
    base = tt_llama3.llama3_args[flavor]
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return Llama3Args(**{**values, **changes})


def _param_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"torchtitan.llama3:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def _seeded_fill_(param: torch.Tensor, key: str, seed: int, std: float, bound: float | None) -> None:
    """Draw the full tensor in fp32 from a generator seeded by (seed, key); keep this rank's shard."""
    local = param.to_local() if isinstance(param, DTensor) else param
    generator = torch.Generator(device=local.device).manual_seed(_param_seed(seed, key))
    full = torch.empty(param.shape, dtype=torch.float32, device=local.device)
    if bound is None:
        full.normal_(0.0, std, generator=generator)
    else:
        nn.init.trunc_normal_(full, 0.0, std, -bound, bound, generator=generator)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    local.copy_(full)


class SeededLlama3(tt_model.Transformer):
    """torchtitan's Llama 3 ``Transformer`` whose init does not depend on the parallel degrees.

    With a seed, :meth:`init_weights` draws each parameter whole from a generator seeded by (seed,
    parameter name), with torchtitan's distributions, and keeps the local shard (Note [Seeded init of
    torchtitan's Llama 3]): the same seed gives the same full weights for any degrees and devices.

    ``block_causal`` flavors (``debugmodel_flex_attn``, ``8B_varlen``, ...) attend with cp_dtensor's
    document attention instead of FlexAttention / varlen; their attention masks are the document ids
    (Note [block_causal with cp_dtensor]).

    Args:
        model_args: torchtitan ``TransformerModelArgs`` (or :class:`Llama3Args`).
    """

    def __init__(self, model_args: tt_llama3.TransformerModelArgs) -> None:
        super().__init__(model_args)
        if uses_document_ids(model_args):
            apply_document_attention(self)

    def get_attention_masks(
        self,
        input_batch: torch.Tensor,
        tokenizer: BaseTokenizer | None,
        extra_inputs: dict[str, torch.Tensor] | None = None,
    ) -> Any:
        """torchtitan's masks; for ``block_causal`` the (B, S) int32 document ids of the whole rows.

        The ids number the documents as torchtitan's mask builder does (:func:`eos_document_ids`, the
        tokenizer's EOS id).

        Raises:
            ValueError: ``block_causal`` without a tokenizer that has an EOS id.
        """
        if not uses_document_ids(self.model_args):
            return super().get_attention_masks(input_batch, tokenizer, extra_inputs)
        eos_id = getattr(tokenizer, "eos_id", None)
        if eos_id is None:
            raise ValueError(
                f"attn_mask_type 'block_causal' finds documents by EOS tokens, but the tokenizer "
                f"({type(tokenizer).__name__}) has no eos_id; use a dataset with a tokenizer: "
                f'training.dataset = "text" (bytes, EOS 257) or a HuggingFace dataset with model.hf_assets_path.'
            )
        return eos_document_ids(input_batch, eos_id)  # (B, S)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, seed: int | None = None) -> None:
        """Initialize parameters and the RoPE buffer.

        Args:
            buffer_device: device of the RoPE buffer (torchtitan's argument).
            seed: init seed; None takes ``model_args.init_seed``, and if that is None too this is torchtitan's
                own ``init_weights`` (global RNG). Parameters must not be on the meta device.
        """
        seed = seed if seed is not None else getattr(self.model_args, "init_seed", None)
        if seed is None:
            super().init_weights(buffer_device=buffer_device)
            return
        with torch.device(buffer_device or self.freqs_cis.device):
            self.freqs_cis = self._precompute_freqs_cis()
        if self.tok_embeddings is not None:
            _seeded_fill_(self.tok_embeddings.weight, "tok_embeddings.weight", seed, 1.0, None)
        for name, layer in self.layers.items():
            block = getattr(layer, "_checkpoint_wrapped_module", layer)  # under activation checkpointing
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            # torchtitan: std 0.02 for wq/wk/wv/w1, the depth-scaled weight_init_std for wo/w2/w3, cut at +-2.
            std_out = block.weight_init_std
            for module_name, weights in (
                ("attention", ("wq", "wk", "wv", "wo")),
                ("feed_forward", ("w1", "w2", "w3")),
            ):
                module = getattr(block, module_name)
                for w in weights:
                    std = 0.02 if w in ("wq", "wk", "wv", "w1") else std_out
                    key = f"layers.{name}.{module_name}.{w}.weight"
                    _seeded_fill_(getattr(module, w).weight, key, seed, std, 2.0)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            std = self.model_args.dim**-0.5
            _seeded_fill_(self.output.weight, "output.weight", seed, std, 3 * std)


class _Attention(tt_model.Attention):
    """torchtitan's ``Attention`` called as cp_dtensor's, ``attention(x, rope, document_ids, positions)``
    (the last two always None here); ``sdpa`` names its SDPA module."""

    @property
    def sdpa(self) -> nn.Module:
        """The SDPA wrapper that cp_dtensor's CP style applies to (torchtitan's ``inner_attention``)."""
        return self.inner_attention

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, rope: torch.Tensor, document_ids: None = None, positions: None = None
    ) -> torch.Tensor:
        """Self-attention; ``rope`` (S, head_dim / 2) complex holds the RoPE factors of x's positions."""
        return super().forward(x, rope, None)


class _Block(tt_model.TransformerBlock):
    """torchtitan's ``TransformerBlock`` called as ``block(x, rope)`` (two arguments, as cp_dtensor's)."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Pre-norm block: ``h = x + attention(norm(x))``, ``h + feed_forward(norm(h))``."""
        # cp_dtensor's TP plan prepares attention's four inputs (x, rope, document_ids, positions)
        h = x + self.attention(self.attention_norm(x), rope, None, None)  # (B, S, dim)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, S, dim)


class TorchtitanLlama3(SeededLlama3):
    """torchtitan's Llama 3 with cp_dtensor's model interface.

    Note [torchtitan's Llama 3 in cp_dtensor's trainer]. Same modules, parameter names and numerics as torchtitan's; the blocks and attentions take the RoPE
    factors of their positions instead of (freqs_cis, attention_masks, positions), so cp_dtensor's TP plan,
    CP styles, activation checkpointing, FSDP and pipeline split apply unchanged. ``args`` is the matching
    cp_dtensor :class:`~cp_dtensor.models.llama.ModelArgs`.

    Args:
        model_args: torchtitan ``TransformerModelArgs`` with ``attn_type == "sdpa"``.
    """

    def __init__(self, model_args: tt_llama3.TransformerModelArgs) -> None:
        super().__init__(model_args)
        for block in self.layers.values():
            # Swap in the subclasses (they add no state) rather than re-running torchtitan's constructors;
            # FSDP2 swaps module classes the same way.
            block.__class__ = _Block
            block.attention.__class__ = _Attention
        self.args = _cp_dtensor_args(model_args)

    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
        layout_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model (or a pipeline stage of it).

        Args:
            tokens: token ids (B, S) int64; hidden states (B, S, dim) when ``tok_embeddings`` is None.
            positions: global positions (B, S) or (S,) of the tokens (their CP layout order); the rows of a
                batch must share their positions, as cp_dtensor's batches do. Defaults to ``arange(S)``.
            document_ids: must be None (see Raises).
            rope_positions: must be None (see Raises).
            layout_positions: must be None (see Raises): a data-dependent CP layout (Note [Travelling layout])
                serves packed documents.

        Returns:
            Logits (B, S, vocab_size), or hidden states (B, S, dim) when ``output`` is None.

        Raises:
            ValueError: for ``document_ids`` or ``rope_positions`` (this adapter serves causal attention over
                whole rows with one RoPE position table per batch; packed documents run with cp_dtensor's own
                Llama or torchtitan's block_causal flavors in torchtitan's trainer).
        """
        if document_ids is not None or rope_positions is not None or layout_positions is not None:
            given = (
                "document_ids"
                if document_ids is not None
                else "rope_positions (data.reset_positions)"
                if rope_positions is not None
                else "a balanced CP layout (parallelism.context_parallel_layout)"
            )
            raise ValueError(
                f"TorchtitanLlama3 in cp_dtensor's trainer serves causal attention over whole rows and got "
                f'{given}; for packed documents use model.name = "llama3".'
            )
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, S, dim)
        if positions is None:
            rope = self.freqs_cis[: h.shape[1]]  # (S, head_dim / 2) complex64
        else:
            rope = self.freqs_cis[positions[0] if positions.dim() == 2 else positions]  # (S, head_dim / 2)
        for layer in self.layers.values():
            h = layer(h, rope)  # (B, S, dim)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def _cp_dtensor_args(a: tt_llama3.TransformerModelArgs) -> ModelArgs:
    scaling = a.rope_scaling_args  # torchtitan's Llama 3 always applies Llama 3.1's RoPE scaling
    return ModelArgs(
        dim=a.dim,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        vocab_size=a.vocab_size,
        multiple_of=a.multiple_of,
        ffn_dim_multiplier=a.ffn_dim_multiplier,
        norm_eps=a.norm_eps,
        rope_theta=float(a.rope_theta),
        max_seq_len=a.max_seq_len,
        causal=True,
        rope_scaling=RopeScaling(
            "llama3",
            factor=float(scaling.scaling_factor),
            original_max_position_embeddings=int(scaling.original_max_position_embeddings),
            low_freq_factor=float(scaling.low_freq_factor),
            high_freq_factor=float(scaling.high_freq_factor),
        ),
    )


def torchtitan_llama3_flavors() -> dict[str, ModelArgs]:
    """``{flavor: cp_dtensor ModelArgs}`` of torchtitan's Llama 3 flavors with SDPA attention."""
    return {
        name: _cp_dtensor_args(llama3_args(name))
        for name, a in tt_llama3.llama3_args.items()
        if a.attn_type == "sdpa"
    }


def build_torchtitan_llama3_from_args(args: ModelArgs) -> TorchtitanLlama3:
    """torchtitan's Llama 3 with the shape of ``args`` (as :func:`torchtitan_llama3_flavors` gives them).

    Raises:
        ValueError: ``args`` asks for what torchtitan's Llama 3 does not have (bidirectional attention,
            sliding windows, q/k norms, an explicit head size or SwiGLU width, tied embeddings, a RoPE
            scaling other than Llama 3.1's).
    """
    scaling = args.rope_scaling
    unsupported = {
        "bidirectional attention": not args.causal,
        "sliding windows": bool(args.sliding_window),
        "q/k norms": args.qk_norm,
        "an explicit head_dim": args.attention_head_dim is not None,
        "an explicit SwiGLU width": args.ffn_hidden_size is not None,
        "tied embeddings": args.tie_embeddings,
        f"RoPE scaling {scaling.type!r}": scaling.type != "llama3",
    }
    refused = [what for what, bad in unsupported.items() if bad]
    if refused:
        raise ValueError(
            f'model.name "torchtitan.llama3" cannot build a model with {", ".join(refused)}; use model.name '
            f'"llama3" (or "qwen3") for that.'
        )
    tt_args = Llama3Args(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        multiple_of=args.multiple_of,
        ffn_dim_multiplier=args.ffn_dim_multiplier,
        norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_seq_len=args.max_seq_len,
        rope_scaling_args=RoPEScalingArgs(
            scaling_factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        ),
    )
    return TorchtitanLlama3(tt_args)


def _sdpa_args(flavor: str, seq_len: int, causal: bool) -> Llama3Args:
    flavors = sorted(name for name, a in tt_llama3.llama3_args.items() if a.attn_type == "sdpa")
    if flavor not in flavors:
        raise ValueError(
            f"model.flavor {flavor!r} is not a torchtitan Llama 3 flavor with SDPA attention; choose one of "
            f'{flavors} for model.name = "torchtitan.llama3".'
        )
    if not causal:
        raise ValueError(
            'model.attention_mask = "bidirectional" is not available for model.name = "torchtitan.llama3" '
            "(torchtitan's Llama 3 attention is causal)."
        )
    return llama3_args(flavor, max_seq_len=seq_len)


def torchtitan_llama3_args(flavor: str, *, seq_len: int, causal: bool = True) -> ModelArgs:
    """cp_dtensor ``ModelArgs`` of torchtitan's Llama 3 ``flavor`` (for validation, TP and FLOPs).

    Raises:
        ValueError: unknown or non-SDPA flavor, or ``causal=False`` (torchtitan's attention is causal).
    """
    return _cp_dtensor_args(_sdpa_args(flavor, seq_len, causal))


def build_torchtitan_llama3(flavor: str, *, seq_len: int, causal: bool = True) -> TorchtitanLlama3:
    """torchtitan's Llama 3 ``flavor`` for cp_dtensor's trainer, RoPE table for ``seq_len`` positions.

    Built on the current default device (``with torch.device("meta"):`` for a shape-only model); then
    parallelize, ``to_empty`` and ``init_weights(seed=...)``.

    Raises:
        ValueError: as :func:`torchtitan_llama3_args`.
    """
    return TorchtitanLlama3(_sdpa_args(flavor, seq_len, causal))
