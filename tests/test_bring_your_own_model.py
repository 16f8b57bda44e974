"""A model that is not ours under CP (and CP x FSDP2), and the SDPA mode's rules for plain and DTensor inputs.

The model (``TinyLM``) computes q, k, v inline in an attention module that takes ``x`` and calls
``F.scaled_dot_product_attention`` itself - the shape of most user models. The README's path applies to
it unchanged: ``shard_batch`` -> ``apply_context_parallel(model, mesh, attention="blocks.*.attn")`` ->
``fully_shard`` -> loss on local shards.

Tolerance: fp32 against the same model run single-process on the full sequence, 2e-5 absolute on logits
and gradients - the ring changes only the summation order of the softmax (fp32 rounding ~1e-7 per op
through two layers) and FSDP the order of the gradient sum.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import cached_world_mesh
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import cp_dtensor as cpd

ATOL = 2e-5


class SelfAttention(nn.Module):
    """Takes x; q, k, v from one fused projection; SDPA called inline (not a separate module)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.ln2, self.mlp = (
            nn.LayerNorm(dim),
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """GPT-2-like: token + learned position embeddings, two blocks, a head."""

    def __init__(self, vocab: int = 97, dim: int = 32, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(2)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _model_and_batch() -> tuple[TinyLM, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyLM()
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
    return model, {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def _reference(model: TinyLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    positions = torch.arange(32).expand(2, 32)
    logits = model(batch["tokens"], positions)
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()  # mean over all tokens
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return logits.detach(), grads


def run_own_model_under_cp(layout: str, with_fsdp: bool, with_blocks: bool) -> dict[str, float]:
    """The README's path on TinyLM; max abs errors of logits and gradients against one process."""
    mesh = cached_world_mesh(cp=dist.get_world_size())["cp"]
    model, batch = _model_and_batch()
    ref_logits, ref_grads = _reference(model, batch)
    cpd.apply_context_parallel(
        model,
        mesh,
        attention="blocks.*.attn",
        blocks="blocks.*" if with_blocks else (),
        final="head" if with_blocks else (),
        layout=layout,
    )
    if with_fsdp:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    shards = cpd.shard_batch(batch, mesh, layout=layout)
    logits = model(shards["tokens"], shards["positions"])  # (B, S_local, V), local
    assert not isinstance(logits, DTensor)
    # Mean over local tokens; FSDP averages gradients over the CP ranks, which hold equal token counts,
    # so the result is the gradient of the global mean (README: "The loss under CP").
    loss = F.cross_entropy(logits.flatten(0, 1), shards["labels"].to_local().flatten())
    loss.backward()
    errors = {
        "logits": (cpd.unshard_sequence_output(logits, mesh, layout=layout) - ref_logits).abs().max().item()
    }
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
        if not with_fsdp:  # without FSDP nothing averages the CP ranks' gradients: do it here
            dist.all_reduce(grad, group=mesh.get_group())
            grad /= mesh.size()
        errors[name] = (grad - ref_grads[name]).abs().max().item()
    return errors


@pytest.mark.parametrize(
    ("layout", "with_fsdp", "with_blocks"),
    [("zigzag", True, True), ("contiguous", True, False), ("zigzag", False, False)],
)
def test_own_model_under_cp_matches_one_process(
    layout: str, with_fsdp: bool, with_blocks: bool, dist_pool
) -> None:
    for rank_errors in dist_pool(2).run(run_own_model_under_cp, layout, with_fsdp, with_blocks):
        for name, err in rank_errors.items():
            assert err <= ATOL, (
                f"{layout} fsdp={with_fsdp} blocks={with_blocks} {name}: max abs err {err:.3g}"
            )


def run_mode_rules() -> dict[str, object]:
    """What the SDPA mode does with plain tensors (with / without a mesh) and natural-order DTensors."""
    cp = dist.get_world_size()
    mesh = cached_world_mesh(cp=cp)["cp"]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8 * cp, 4, generator=g, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    found: dict[str, object] = {}
    local = [cpd.shard_sequence(t, mesh, 2) for t in (q, k, v)]
    try:
        with cpd.ContextParallelAttention():
            F.scaled_dot_product_attention(*local, is_causal=True)
        found["plain_no_mesh"] = "no error"
    except ValueError as e:
        found["plain_no_mesh"] = str(e)
    with cpd.ContextParallelAttention(mesh):  # plain tensors: zigzag shards by default, as shard_sequence
        out = F.scaled_dot_product_attention(*local, is_causal=True)
    found["plain_with_mesh"] = (out - cpd.shard_sequence(want, mesh, 2)).abs().max().item()
    # distribute_tensor: natural order (Shard(2) means contiguous chunks); the default mode treats it so.
    dts = [distribute_tensor(t, mesh, [Shard(2)]) for t in (q, k, v)]
    with cpd.ContextParallelAttention():
        out = F.scaled_dot_product_attention(*dts, is_causal=True)
    found["dtensor_natural"] = (out.full_tensor() - want).abs().max().item()
    return found


def test_mode_never_treats_a_shard_as_the_sequence(dist_pool) -> None:
    for found in dist_pool(2).run(run_mode_rules):
        assert "plain tensors inside ContextParallelAttention, which holds no mesh" in found["plain_no_mesh"]
        assert found["plain_with_mesh"] <= 1e-12
        assert found["dtensor_natural"] <= 1e-12


def test_pattern_that_matches_nothing_names_the_modules() -> None:
    from torch.distributed.device_mesh import DeviceMesh

    model = TinyLM()
    mesh = DeviceMesh.__new__(DeviceMesh)  # never used: the pattern check comes first
    with pytest.raises(ValueError, match=r"attention pattern 'layers\.\*\.attn' matches no module of TinyLM"):
        cpd.apply_context_parallel(model, mesh, attention="layers.*.attn")
