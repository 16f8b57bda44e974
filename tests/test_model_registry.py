"""The model registry: a family registered from this test file is selected by ``model.name`` and trained by
the trainer without any change to the library (Note [Model registry]).

The toy family (``ToyGPT``) is deliberately unlike our Llama: learned absolute position embeddings, a fused
qkv projection, SDPA called inline, LayerNorm, a GELU MLP, its own parallelize function (CP + FSDP, no TP)
and no pipeline split. Reference: the same job without CP (data parallel over the same global batches);
losses equal within 1e-5 relative (CP changes only the softmax's summation order, FSDP the gradient sum's).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cp_dtensor.config import ConfigError, JobConfig
from cp_dtensor.context_parallel import apply_context_parallel
from cp_dtensor.models import ModelArgs, ModelSpec, get_model_spec, model_names, register_model
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.parallelize import apply_fsdp
from cp_dtensor.styles import PrepareSequenceShards

LOSS_RTOL = 1e-5


class ToyBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.heads = args.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(args.dim), nn.LayerNorm(args.dim)
        self.attn = ToyAttention(args)
        self.mlp = nn.Sequential(
            nn.Linear(args.dim, 4 * args.dim), nn.GELU(), nn.Linear(4 * args.dim, args.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ToyAttention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.heads = args.n_heads
        self.qkv = nn.Linear(args.dim, 3 * args.dim)
        self.proj = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class ToyGPT(nn.Module):
    """The interface the trainer needs: forward(tokens, positions=...), init_weights(seed), args, layers."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok = nn.Embedding(args.vocab_size, args.dim)
        self.pos = nn.Embedding(args.max_seq_len, args.dim)
        self.layers = nn.ModuleDict({str(i): ToyBlock(args) for i in range(args.n_layers)})
        self.norm = nn.LayerNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab_size)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok(tokens) + self.pos(positions)  # (B, S, dim)
        for block in self.layers.values():
            h = block(h)
        return self.head(self.norm(h))  # (B, S, V)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        # Full tensors drawn from one generator in a fixed order, then sliced to the shards: the same
        # weights for any degrees.
        from torch.distributed.tensor import DTensor, distribute_tensor

        generator = torch.Generator().manual_seed(seed or 0)
        for p in self.parameters():
            full = torch.randn(p.shape, generator=generator) * 0.05
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(full)
            else:
                p.copy_(full)

    def init_buffers(self) -> None:
        pass


def parallelize_toy(model: nn.Module, parallel_dims: ParallelDims, **settings: Any) -> Any:
    """CP on the inline SDPA of each block, then FSDP; TP is not offered by this family."""
    if parallel_dims.tp_enabled:
        raise ValueError("the toy family has no tensor-parallel plan")
    cp_attention = None
    if parallel_dims.cp_enabled:
        cp_attention = apply_context_parallel(
            model,
            parallel_dims.activation_mesh,
            attention="layers.*.attn",
            blocks="layers.*",
            final="norm",
            settings=settings["cp_settings"],
        )
    else:
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, parallel_dims.activation_mesh, PrepareSequenceShards(use_local_output=True))
    if parallel_dims.fsdp_enabled:
        apply_fsdp(model, parallel_dims)
    return cp_attention


TOY_SPEC = register_model(
    ModelSpec(
        name="test.toy_gpt",
        flavors={"tiny": ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=256)},
        build=ToyGPT,
        parallelize=parallelize_toy,
        description="a GPT-2-like toy registered by tests/test_model_registry.py",
    )
)


def _config(dump: str = "/tmp/cpd_registry_test", **parallelism: int) -> dict:
    return {
        "model": {"name": "test.toy_gpt", "flavor": "tiny"},
        "training": {"seq_len": 128, "local_batch_size": 2, "global_batch_size": 4, "steps": 4, "lr": 3e-3},
        "parallelism": {"context_parallel_comm": "p2p", **parallelism},
        "data": {"dataset": "synthetic_recall"},
        "metrics": {"log_freq": 1},
        "job": {"dump_folder": dump},
    }


def run_trainer_losses(cfgs: list[dict]) -> list[list[float]]:
    """Train every config on this rank (the toy family is registered by importing this module)."""
    from cp_dtensor.trainer import Trainer

    return [[r.loss for r in Trainer(JobConfig.from_dict(cfg)).train()] for cfg in cfgs]


def test_registered_toy_family_trains_through_the_trainer_under_cp(tmp_path, dist_pool) -> None:
    assert "test.toy_gpt" in model_names()
    cp2 = _config(str(tmp_path / "cp2"), context_parallel_degree=2)
    dp2 = _config(str(tmp_path / "dp2"), data_parallel_degree=2, context_parallel_degree=1)
    with_cp, without_cp = dist_pool(2).run(run_trainer_losses, [cp2, dp2])[0]
    assert len(with_cp) == 4
    for step, (a, b) in enumerate(zip(with_cp, without_cp, strict=True), start=1):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: cp2 {a} vs dp2 {b}"
    assert with_cp[-1] < with_cp[0]


def test_family_without_pipeline_split_refuses_pp() -> None:
    from cp_dtensor.trainer import validate_job

    cfg = JobConfig.from_dict(_config(pipeline_parallel_degree=2, context_parallel_degree=1))
    with pytest.raises(ValueError, match=r"'test\.toy_gpt' has no pipeline split"):
        validate_job(cfg, 2)


def test_unknown_model_name_is_one_line_listing_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict({"model": {"name": "llama4"}})
    message = str(err.value)
    assert "\n" not in message
    for name in ("llama3", "qwen3", "torchtitan.llama3", "test.toy_gpt"):
        assert f'"{name}"' in message


def test_unknown_flavor_lists_the_family_flavors() -> None:
    with pytest.raises(
        ValueError, match=r"model.flavor 'huge' is unknown for model.name 'qwen3'.*'0.6B'.*'hf'"
    ):
        get_model_spec("qwen3").model_args("huge")


def test_a_taken_name_cannot_be_registered_again_with_another_spec() -> None:
    register_model(TOY_SPEC)  # the same spec again: a no-op (modules may be imported twice)
    other = ModelSpec(name="test.toy_gpt", flavors={}, build=ToyGPT, parallelize=parallelize_toy)
    with pytest.raises(ValueError, match="already registered"):
        register_model(other)


def test_hf_options_need_a_family_with_an_hf_adapter() -> None:
    from cp_dtensor.trainer import validate_job

    cfg = _config()
    cfg["checkpoint"] = {"enable": True, "last_save_in_hf": True}
    with pytest.raises(ValueError, match=r"last_save_in_hf: model\.name 'test\.toy_gpt' has no HuggingFace"):
        validate_job(JobConfig.from_dict(cfg), 1)
