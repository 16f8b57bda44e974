"""Unit tests for the plain Llama model (single process, CPU, fast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cp_dtensor.models import (
    LLAMA3_FLAVORS,
    ModelArgs,
    ScaledDotProductAttention,
    Transformer,
    build_llama,
    count_params,
    model_flops_per_token,
)
from cp_dtensor.models.llama import matmul_param_count


def _model(
    flavor: str = "debug", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> Transformer:
    model = build_llama(flavor, **overrides)
    model.init_weights(seed)
    return model.to(dtype)


@pytest.mark.parametrize(("flavor", "kv_heads"), [("debug_mha", 4), ("debug", 2), ("debug_mqa", 1)])
def test_shapes_mha_gqa_mqa(flavor: str, kv_heads: int) -> None:
    model = _model(flavor)
    args = model.args
    assert args.kv_heads == kv_heads
    attn = model.layers["0"].attention
    assert attn.wk.weight.shape == (kv_heads * args.head_dim, args.dim)
    assert attn.wq.weight.shape == (args.n_heads * args.head_dim, args.dim)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, args.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_sdpa_module_receives_unrepeated_kv_heads() -> None:
    model = _model("debug")
    seen: list[tuple[torch.Size, torch.Size, torch.Size]] = []
    sdpa = model.layers["0"].attention.sdpa
    assert isinstance(sdpa, ScaledDotProductAttention)
    sdpa.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.shape for a in args[:3])))
    model(torch.randint(0, 512, (2, 16)))
    (q_shape, k_shape, v_shape) = seen[0]
    assert q_shape == (2, 4, 16, 16)  # (B, Hq, S, D)
    assert k_shape == v_shape == (2, 2, 16, 16)  # (B, Hkv, S, D)


def test_layers_are_module_dict_and_stage_friendly() -> None:
    model = _model("debug_deep")
    assert list(model.layers.keys()) == ["0", "1", "2", "3"]
    del model.layers["1"]
    assert list(model.layers.keys()) == ["0", "2", "3"]
    assert model.layers["2"].layer_id == 2
    model(torch.randint(0, 512, (1, 8)))  # still runs


def test_init_is_deterministic_and_seed_dependent() -> None:
    a = _model("debug", seed=3)
    b = _model("debug", seed=3)
    c = _model("debug", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    # Norms are ones; output projections are depth-scaled (smaller std in deeper layers).
    assert torch.equal(sa["norm.weight"], torch.ones(64))
    std0 = sa["layers.0.attention.wo.weight"].std().item()
    std1 = sa["layers.1.attention.wo.weight"].std().item()
    assert std0 == pytest.approx(0.02 / 2**0.5, rel=0.1)
    assert std1 == pytest.approx(0.02 / 4**0.5, rel=0.1)
    assert sa["layers.0.attention.wq.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_init_does_not_depend_on_other_layers_or_wrapping() -> None:
    """A pipeline stage that deleted layers initializes its remaining layers like the full model."""
    full = _model("debug_deep", seed=7)
    stage = build_llama("debug_deep")
    del stage.layers["0"], stage.layers["1"]
    stage.tok_embeddings = None
    stage.init_weights(7)
    for key, value in stage.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key


def test_meta_then_to_empty_init_matches_eager_init() -> None:
    eager = _model("debug", seed=11)
    with torch.device("meta"):
        lazy = build_llama("debug")
    lazy.to_empty(device="cpu")
    lazy.init_weights(11)
    for key, value in lazy.state_dict().items():
        assert torch.equal(value, eager.state_dict()[key]), key
    assert torch.equal(lazy.rope.inv_freq, eager.rope.inv_freq)
    tokens = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(lazy(tokens), eager(tokens), rtol=0, atol=0)


def test_init_on_meta_device_is_a_clear_error() -> None:
    with torch.device("meta"):
        model = build_llama("debug")
    with pytest.raises(RuntimeError, match="to_empty"):
        model.init_weights(0)


def test_positions_drive_rope_bidirectional_permutation_equivariance() -> None:
    """Bidirectional attention + RoPE from the given positions: permuting (tokens, positions) permutes logits.

    fp64 so the only differences are summation-order rounding (tolerance 1e-10).
    """
    model = _model("debug", dtype=torch.float64, causal=False)
    seq = 32
    tokens = torch.randint(0, 512, (2, seq))
    positions = torch.arange(seq)
    perm = torch.randperm(seq, generator=torch.Generator().manual_seed(0))
    ref = model(tokens, positions)  # (B, S, V)
    out = model(tokens[:, perm], positions[perm])  # (B, S, V)
    torch.testing.assert_close(out, ref[:, perm], rtol=1e-10, atol=1e-10)
    # The positions really matter: permuted tokens with default positions give something else (far beyond
    # the fp64 rounding level above; at init attention is nearly uniform, so the gap is small but clear).
    assert (model(tokens[:, perm]) - ref[:, perm]).abs().max() > 1e-5
    # (B, S) positions give the same as broadcast (S,) positions.
    torch.testing.assert_close(model(tokens, positions.expand(2, seq)), ref, rtol=0, atol=0)


def test_causal_output_ignores_future_tokens() -> None:
    model = _model("debug", dtype=torch.float64)
    seq, t = 24, 10
    tokens = torch.randint(0, 512, (1, seq))
    changed = tokens.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 512
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_bidirectional_output_sees_future_tokens() -> None:
    model = _model("debug", dtype=torch.float64, causal=False)
    tokens = torch.randint(0, 512, (1, 16))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 512
    assert not torch.allclose(model(tokens)[:, 0], model(changed)[:, 0])


def test_stage_without_embeddings_accepts_hidden_states() -> None:
    model = _model("debug_deep", dtype=torch.float64)
    tokens = torch.randint(0, 512, (2, 16))
    ref = model(tokens)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    # Stage 0: embeddings + layers 0, 1, hidden states out.
    del first.layers["2"], first.layers["3"]
    first.norm, first.output = None, None
    # Stage 1: hidden states in, layers 2, 3 + norm + output.
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings = None
    hidden = first(tokens)
    assert hidden.shape == (2, 16, 64)
    torch.testing.assert_close(last(hidden), ref, rtol=0, atol=0)


def test_positions_shape_is_validated() -> None:
    model = _model("debug")
    with pytest.raises(ValueError, match="a multiple of 8"):
        model(torch.randint(0, 512, (1, 8)), torch.arange(7))


def test_backward_runs_and_reaches_all_params() -> None:
    model = _model("debug")
    tokens = torch.randint(0, 512, (2, 32))
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_llama3_param_counts_on_meta() -> None:
    with torch.device("meta"):
        m8 = build_llama("8B")
        m70 = build_llama("70B")
    assert m8.args.ffn_hidden_dim == 14336
    assert m70.args.ffn_hidden_dim == 28672
    assert count_params(m8) == pytest.approx(8.03e9, rel=0.005)
    assert count_params(m70) == pytest.approx(70.6e9, rel=0.005)
    # The FLOP formula's parameter count = all params minus embedding and norms.
    for model in (m8, m70):
        args = model.args
        norms = (2 * args.n_layers + 1) * args.dim
        assert matmul_param_count(args) == count_params(model, exclude_embedding=True) - norms


def test_model_flops_per_token() -> None:
    args = LLAMA3_FLAVORS["8B"]
    seq = 8192
    dense = 6 * matmul_param_count(args)
    attn = 12 * args.n_layers * args.dim * seq
    assert model_flops_per_token(args, seq) == pytest.approx(dense + attn / 2)
    assert model_flops_per_token(args, seq, causal=False) == pytest.approx(dense + attn)


def test_build_llama_validates() -> None:
    with pytest.raises(ValueError, match="unknown llama flavor"):
        build_llama("nope")
    with pytest.raises(ValueError, match="unknown ModelArgs"):
        build_llama("debug", width=3)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    assert build_llama("debug", causal=False).layers["0"].attention.sdpa.causal is False


def test_per_document_rotary_positions_change_nothing_under_the_document_mask() -> None:
    """RoPE is relative and a document sees only itself: restarting positions per document (rope_positions)
    gives the same logits up to rounding, while the tokens' places (positions) stay global."""
    model = _model("debug")
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    ids = torch.zeros(2, 40, dtype=torch.int64)
    ids[0, 9:], ids[0, 25:], ids[1, 31:] = 1, 2, 1
    positions = torch.arange(40).expand(2, 40)
    starts = torch.zeros_like(ids)
    for b in range(2):
        for d in ids[b].unique():
            sel = ids[b] == d
            starts[b, sel] = int(torch.nonzero(sel)[0])
    per_doc = positions - starts
    a = model(tokens, positions, ids)
    b = model(tokens, positions, ids, per_doc)
    assert (a - b).abs().max().item() < 1e-5
