"""HuggingFace checkpoints in and out, against transformers (the reference), single process, fp32.

Each test builds a tiny random model with transformers' own config classes (no download), and compares
our model with transformers' on the same weights.

Tolerances: logits 2e-5 absolute (measured up to 7.2e-7, logits of magnitude ~1): the conversion is exact
(a permutation of rows, Note [q/k permutation]), so the two models differ only in fp32 summation order
(matmul blocking, SDPA kernels, the interleaved vs half-split RoPE arithmetic). RoPE tables 2e-5: both
compute the angles in fp32 from frequencies rounded differently by at most an ulp or two, times positions
up to 200 (measured: 0, the tables are bit-identical, since both compute in fp32 alike).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import cp_dtensor as cpd  # noqa: E402
from cp_dtensor.models import RopeOverrides, RopeScaling, build_llama, get_model_spec  # noqa: E402
from cp_dtensor.models.hf import (  # noqa: E402
    HFCheckpointReader,
    check_hf_checkpoint,
    permute_from_hf,
    permute_to_hf,
    rope_from_hf_config,
)

LOGIT_ATOL = 2e-5
ROPE_ATOL = 2e-5
SEQ = 200  # beyond every original context used below (32 / 64)


def _hf_model(family: str, **config: object) -> torch.nn.Module:
    """A tiny random transformers model whose norm weights are not all ones (so their mapping is tested)."""
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    base.update(config)
    cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**base), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _report(report_dir: Path | None, case: str, error: float) -> None:
    """Append one measured error to ``--report-dir``/hf_parity.md (docs/pretrained.md quotes it)."""
    if report_dir is not None:
        with open(report_dir / "hf_parity.md", "a") as f:
            f.write(f"| {case} | {error:.2e} |\n")


def _logits_error(hf_model: torch.nn.Module, ours: torch.nn.Module, seq: int = SEQ) -> float:
    ids = torch.randint(0, hf_model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((hf_model(ids).logits - ours(ids)).abs().max())


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("llama", {}),  # GQA, untied
        ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),  # MHA, tied (Llama 3.2 1B/3B)
        ("qwen3", {"head_dim": 32}),  # q/k norms, head_dim 32 with 4 heads of a 64-wide model
        ("qwen3", {"head_dim": 32, "num_key_value_heads": 1, "tie_word_embeddings": True}),  # MQA, tied
    ],
    ids=["llama-gqa-untied", "llama-mha-tied", "qwen3-gqa-headdim", "qwen3-mqa-tied"],
)
def test_logits_equal_transformers(tmp_path: Path, family: str, config: dict, report_dir, request) -> None:
    hf = _hf_model(family, **config)
    hf.save_pretrained(tmp_path)
    ours = cpd.models.from_pretrained(tmp_path)
    assert ours.args.qk_norm == (family == "qwen3")
    assert ours.args.tie_embeddings == bool(config.get("tie_word_embeddings"))
    if ours.args.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight
    error = _logits_error(hf, ours)
    _report(report_dir, f"logits, {request.node.callspec.id}", error)
    assert error <= LOGIT_ATOL


ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # dynamic NTK grows from max_position_embeddings (64 here): SEQ = 200 positions scale it by 200 / 64
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def _hub_spelling(params: dict) -> dict:
    """The same RoPE in the Hub's config.json spelling: rope_theta beside rope_scaling (old key "type")."""
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    if params["rope_type"] == "default":
        return {"rope_theta": params["rope_theta"], "rope_scaling": None}
    return {"rope_theta": params["rope_theta"], "rope_scaling": {"type": params["rope_type"], **scaling}}


@pytest.mark.parametrize("spelling", ["rope_parameters", "hub"])
@pytest.mark.parametrize("rope", sorted(ROPE_CASES))
def test_rope_types_equal_transformers_beyond_the_original_context(
    tmp_path: Path, rope: str, spelling: str, report_dir
) -> None:
    params = ROPE_CASES[rope]
    max_pos = 64 if rope == "dynamic" else 256
    hf = _hf_model("llama", rope_parameters=dict(params), max_position_embeddings=max_pos)
    hf.save_pretrained(tmp_path)
    if spelling == "hub":  # rewrite config.json as the Hub writes it; transformers reads it back too
        config = json.loads((tmp_path / "config.json").read_text())
        config.pop("rope_parameters")
        config.update(_hub_spelling(params))
        (tmp_path / "config.json").write_text(json.dumps(config))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        theta, scaling = rope_from_hf_config(config)
        assert scaling.type == rope and theta == params["rope_theta"]
    ours = cpd.models.from_pretrained(tmp_path)
    assert ours.args.rope_scaling.type == rope
    positions = torch.arange(SEQ)[None]  # (1, S)
    x = torch.zeros(1, SEQ, 64)
    cos, sin = hf.model.rotary_emb(x, positions)  # (1, S, D): HF repeats the D/2 angles twice
    table = ours.rope(positions)  # (1, S, D/2, 2)
    half = ours.args.head_dim // 2
    table_error = max(
        float((table[..., 0] - cos[..., :half]).abs().max()),
        float((table[..., 1] - sin[..., :half]).abs().max()),
    )
    _report(report_dir, f"RoPE cos/sin, {rope} ({spelling})", table_error)
    assert table_error <= ROPE_ATOL
    if rope != "default":  # scaled angles differ from the default ones beyond the original context
        plain = cpd.models.RotaryEmbedding(ours.args.head_dim, ours.args.rope_theta)(positions)
        assert (plain - table).abs().max() > 1e-2
    error = _logits_error(hf, ours)
    _report(report_dir, f"logits, llama with RoPE {rope} ({spelling})", error)
    assert error <= LOGIT_ATOL


def test_qk_permutation_is_an_exact_inverse_and_pairs_rotate_like_rotate_half() -> None:
    head_dim, heads = 8, 3
    w = torch.randn(heads * head_dim, 5)
    assert torch.equal(permute_to_hf(permute_from_hf(w, head_dim), head_dim), w)
    # Our row 2i + c of a head is HF row c * D/2 + i.
    ours = permute_from_hf(w, head_dim)
    for h in range(heads):
        for i in range(head_dim // 2):
            for c in range(2):
                assert torch.equal(ours[h * head_dim + 2 * i + c], w[h * head_dim + c * head_dim // 2 + i])


@pytest.mark.parametrize(
    ("family", "flavor", "rope"),
    [
        ("llama3", "debug", RopeScaling("yarn", factor=4.0, original_max_position_embeddings=64)),
        ("llama3", "debug_mha", RopeScaling("llama3", factor=8.0, original_max_position_embeddings=32)),
        ("qwen3", "debug_tied", RopeScaling("linear", factor=2.0)),
        ("qwen3", "debug", RopeScaling("dynamic", factor=2.0, original_max_position_embeddings=64)),
    ],
    ids=["llama-yarn", "llama-mha-llama3", "qwen3-tied-linear", "qwen3-dynamic"],
)
def test_export_loads_in_transformers_with_equal_logits(
    tmp_path: Path, family: str, flavor: str, rope, report_dir, request
) -> None:
    spec = get_model_spec(family)
    args = spec.model_args(flavor)
    from dataclasses import replace

    ours = spec.build(replace(args, rope_scaling=rope, max_seq_len=256))
    ours.init_weights(seed=3)
    cpd.models.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = "Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    error = _logits_error(hf, ours)
    _report(report_dir, f"export -> transformers, {request.node.callspec.id}", error)
    assert error <= LOGIT_ATOL
    # and back: our model from the export has bit-identical weights
    again = cpd.models.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_round_trip_keeps_the_hf_tensors_bit_identical(tmp_path: Path) -> None:
    hf = _hf_model("qwen3", head_dim=32)
    hf.save_pretrained(tmp_path / "in")
    ours = cpd.models.from_pretrained(tmp_path / "in")
    cpd.models.save_pretrained(ours, tmp_path / "out", max_shard_bytes=60_000)  # several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with HFCheckpointReader(tmp_path / "in") as a, HFCheckpointReader(tmp_path / "out") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in sorted(a.keys()):
            assert torch.equal(a.read(key), b.read(key)), key


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"MistralForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        cpd.models.from_pretrained(tmp_path)


def test_wrong_family_for_flavor_hf_names_the_right_one(tmp_path: Path) -> None:
    _hf_model("qwen3", head_dim=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r'Qwen3ForCausalLM.*set model\.name = "qwen3"'):
        get_model_spec("llama3").model_args("hf", cpd.models.ModelOptions(hf_assets_path=str(tmp_path)))


def test_shape_mismatch_is_one_line_naming_the_first_mismatch(tmp_path: Path) -> None:
    _hf_model("llama").save_pretrained(tmp_path)
    model = build_llama("debug")  # vocab 512, not 256
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        check_hf_checkpoint(shapes, tmp_path, get_model_spec("llama3").hf_adapter, model_name="llama3/debug")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.embed_tokens.weight has shape (256, 64)") and "(512, 64)" in message


def test_rope_overrides_extend_the_context() -> None:
    base = get_model_spec("llama3").model_args("8B")  # Llama 3.1: llama3 x8 from 8192
    theta, scaling, max_len = RopeOverrides(type="yarn", factor=32.0).apply(
        base.rope_theta, base.rope_scaling, base.max_seq_len
    )
    assert scaling == RopeScaling("yarn", factor=32.0, original_max_position_embeddings=8192)
    assert max_len == 8192 * 32 and theta == base.rope_theta
    theta, scaling, _ = RopeOverrides(theta=4e6).apply(base.rope_theta, base.rope_scaling, base.max_seq_len)
    assert theta == 4e6 and scaling == base.rope_scaling
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling("yarn", factor=4.0)


@pytest.mark.parametrize(
    ("file", "family", "flavor"), [("llama3_1_8b.json", "llama3", "8B"), ("qwen3_8b.json", "qwen3", "8B")]
)
def test_published_configs_give_our_8b_flavors(file: str, family: str, flavor: str) -> None:
    """Llama-3.1-8B's and Qwen3-8B's config.json (as published; Hub RoPE spelling) build our 8B flavors."""
    config = json.loads((Path(__file__).parent / "data" / "hf_configs" / file).read_text())
    spec = get_model_spec(family)
    got = spec.hf_adapter.args_from_config(config)
    want = spec.model_args(flavor)
    for name in ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "ffn_hidden_dim", "vocab_size",
                 "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "qk_norm", "tie_embeddings"):  # fmt: skip
        assert getattr(got, name) == getattr(want, name), name


def test_rope_is_overridable_from_the_command_line(tmp_path: Path) -> None:
    from cp_dtensor.config import load_config
    from cp_dtensor.trainer import model_args_for

    _hf_model("qwen3", head_dim=32, max_position_embeddings=64).save_pretrained(tmp_path)
    argv = ["--model.name", "qwen3", "--model.flavor", "hf", "--model.hf_assets_path", str(tmp_path)]
    args = model_args_for(load_config([*argv, "--training.seq_len", "64"]))
    assert args.rope_scaling.type == "default" and args.max_seq_len == 64
    yarn = ["--model.rope_type", "yarn", "--model.rope_factor", "4", "--model.rope_theta", "20000"]
    args = model_args_for(load_config([*argv, *yarn, "--training.seq_len", "256"]))
    assert args.rope_theta == 20000.0 and args.max_seq_len == 256  # 64 trained positions x 4
    assert args.rope_scaling == RopeScaling("yarn", factor=4.0, original_max_position_embeddings=64)
    # dynamic NTK under the trainer scales for training.seq_len on every rank (not per shard's positions)
    dynamic = ["--model.rope_type", "dynamic", "--model.rope_factor", "4", "--training.seq_len", "256"]
    assert model_args_for(load_config([*argv, *dynamic])).rope_scaling.dynamic_seq_len == 256
