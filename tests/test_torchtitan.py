"""torchtitan integration: its trainer with cp_dtensor's CP (cp=2 == cp=1), its Llama 3 in our trainer.

Needs the extra (``pip install "cp_dtensor[torchtitan]"``, torchtitan >= 0.2.2, < 0.3); without it every
test but the missing-extra error is skipped, with that reason.

Tolerances: losses within 1e-5 relative. cp=2 and cp=1 compute the same fp32 math in another order (the
ring merges per-block softmax partials by log-sum-exp; FSDP sums the two CP ranks' gradients), which
moves losses by ~1e-7 per step here and a few 1e-7 after some AdamW steps. Gradient norms within 2e-4:
torchtitan's fp32 ``get_total_norm`` over whole tensors (1 process) vs FSDP shards (2 processes) differ
by up to ~1e-4 by itself (measured 8e-5 off the fp64 norm for the 1-process run), CP or not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from cp_dtensor.config import JobConfig
from cp_dtensor.data import TextDataset

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "train_configs" / "torchtitan" / "llama3_debug_cp2.toml"
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 2e-4

needs_torchtitan = pytest.mark.skipif(
    importlib.util.find_spec("torchtitan") is None,
    reason='torchtitan is not installed: pip install "cp_dtensor[torchtitan]" (torchtitan>=0.2.2,<0.3)',
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, dump: Path, *overrides: str, config: Path = CONFIG) -> subprocess.Popen:
    """torchtitan's trainer through ``-m cp_dtensor.integrations.torchtitan`` on ``nproc`` CPU processes;
    the degrees are in ``config`` (default: the repo's, cp=2) or ``overrides``."""
    port = _free_port()
    entry = ["-m", "cp_dtensor.integrations.torchtitan", "--job.config_file", str(config)]
    if nproc == 1:  # the entry point runs one process by itself (no torchrun agent to start)
        cmd = [sys.executable, *entry]
    else:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port)]
        cmd = [sys.executable, *launcher, *entry]
    args = [f"--job.dump_folder={dump}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    with _log_path(dump).open("w") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _log_path(dump: Path) -> Path:
    return dump.parent / f"{dump.name}.log"


def _metrics(dump: Path) -> list[dict]:
    return [json.loads(line) for line in (dump / "train_log.jsonl").read_text().splitlines()]


@needs_torchtitan
def test_headtail_load_balancer_is_zigzag() -> None:
    """torchtitan shards the batch with PyTorch's head-tail balancer; the ring must assume that layout."""
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer

    from cp_dtensor.integrations.torchtitan import cp_layout_for_load_balancer
    from cp_dtensor.layout import layout_permutation

    layout = cp_layout_for_load_balancer("headtail")
    for cp, seq in ((2, 16), (4, 64)):
        headtail = _HeadTailLoadBalancer(seq, cp, "cpu")._generate_indices().flatten()
        assert torch.equal(headtail, layout_permutation(seq, cp, layout)), (cp, seq)
    assert cp_layout_for_load_balancer(None) == "contiguous"
    with pytest.raises(ValueError, match="ptrr"):
        cp_layout_for_load_balancer("ptrr")


@needs_torchtitan
def test_parallelize_checks_seq_len_and_refuses_compile_with_tp_and_cp() -> None:
    """The train spec's parallelize function validates before touching the model."""
    from types import SimpleNamespace

    from cp_dtensor.integrations.torchtitan import parallelize_llama  # first: torchtitan imports on CPU

    dims = SimpleNamespace(cp=2, tp=2, cp_enabled=True, tp_enabled=True)
    job = importlib.import_module("torchtitan.config").JobConfig()  # torchtitan's, not cp_dtensor's
    job.parallelism.context_parallel_load_balancer = "headtail"
    job.training.seq_len = 250  # zigzag over cp=2 and tp=2: a multiple of 8
    with pytest.raises(ValueError, match=r"training.seq_len=250 must be a multiple of 8 .*use 248 or 256"):
        parallelize_llama(torch.nn.Module(), dims, job)
    job.training.seq_len = 256
    job.compile.enable = True
    with pytest.raises(ValueError, match=r"torch\.compile together with tensor and context parallelism"):
        parallelize_llama(torch.nn.Module(), dims, job)


TRAINER_ARGS = ("--training.seq_len=256", "--training.steps=4", "--metrics.log_freq=1")


@pytest.fixture(scope="module")
def torchtitan_cp1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], list[dict]]]:
    """torchtitan's trainer with cp=1 (one process), started once; call the result for its metrics."""
    dump = tmp_path_factory.mktemp("torchtitan") / "cp1"
    proc = _launch(1, dump, *TRAINER_ARGS, "--parallelism.context_parallel_degree=1")

    def metrics() -> list[dict]:
        rc = proc.wait(timeout=300)
        assert rc == 0, _log_path(dump).read_text()[-4000:]
        return _metrics(dump)

    yield metrics
    if proc.poll() is None:
        proc.kill()


def _check_parity(ref: list[dict], run: list[dict], steps: int = 4) -> None:
    assert [m["step"] for m in ref] == [m["step"] for m in run] == list(range(1, steps + 1))
    for a, b in zip(ref, run, strict=True):
        loss_a, loss_b = a["loss_metrics/global_avg_loss"], b["loss_metrics/global_avg_loss"]
        assert loss_b == pytest.approx(loss_a, rel=LOSS_RTOL), (a["step"], loss_a, loss_b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL), a["step"]


def _run(nproc: int, dump: Path, *overrides: str) -> tuple[list[dict], str]:
    rc = _launch(nproc, dump, *TRAINER_ARGS, *overrides).wait(timeout=300)
    log = _log_path(dump).read_text()
    assert rc == 0, log[-4000:]
    return _metrics(dump), log


@needs_torchtitan
def test_torchtitan_trainer_cp2_matches_cp1(tmp_path: Path, torchtitan_cp1) -> None:
    """torchtitan's own Trainer: cp=2 through cp_dtensor gives the losses of cp=1, step by step."""
    cp2, log = _run(2, tmp_path / "cp2", "--parallelism.context_parallel_degree=2")  # beside the cp=1 run
    assert "Applied cp_dtensor context parallelism (cp 2, layout zigzag, comm p2p)" in log  # our hooks
    assert "Applied Context Parallel to the model" not in log  # not torchtitan's (PyTorch's) CP
    cp1 = torchtitan_cp1()
    _check_parity(cp1, cp2)
    assert cp1[-1]["loss_metrics/global_avg_loss"] < cp1[0]["loss_metrics/global_avg_loss"]  # it trains


@needs_torchtitan
@pytest.mark.slow
def test_torchtitan_trainer_tp2_cp2_matches_cp1(tmp_path: Path, torchtitan_cp1) -> None:
    """TP (sequence + loss parallel) x CP: the logits stay torchtitan's vocab-sharded DTensor."""
    args = ("--parallelism.context_parallel_degree=2", "--parallelism.tensor_parallel_degree=2")
    tp2_cp2, _ = _run(4, tmp_path / "tp2_cp2", *args)
    _check_parity(torchtitan_cp1(), tp2_cp2)


# torchtitan 0.2.2's torchtitan/models/llama3/train_configs/debug_model.toml, changed only where marked "#!".
STOCK_LLAMA3_DEBUG_CONFIG = """
[job]
dump_folder = "./outputs"
description = "Llama 3 debug training"
print_config = false

[profiling]
enable_profiling = false
save_traces_folder = "profile_trace"
profile_freq = 10
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"

[metrics]
log_freq = 1
disable_color_printing = false
enable_tensorboard = false
save_tb_folder = "tb"
enable_wandb = false

[model]
name = "llama3"
flavor = "debugmodel"
# test folder with tokenizer.json, for debug purpose only
hf_assets_path = "./tests/assets/tokenizer"
# converters = ["float8"]

[optimizer]
name = "AdamW"
lr = 8e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = 2  # lr scheduler warm up, normally 20% of the train steps
decay_ratio = 0.8  # lr scheduler decay ratio, 80% of the train steps
decay_type = "linear"
min_lr_factor = 0.0

[training]
local_batch_size = 2  #! 8
seq_len = 256  #! 2048
max_norm = 1.0  # grad norm clipping
steps = 3  #! 10
dataset = "c4_test"  # supported datasets: c4_test (2K), c4 (177M)
mixed_precision_param = "float32"  #! (default bfloat16) cp=1 and cp=2 stay comparable

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default" # default / never / always
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 1
pipeline_parallel_schedule = "Interleaved1F1B"
context_parallel_degree = {cp}  #! 1
context_parallel_load_balancer = "headtail"  #! (the default, written out)

[checkpoint]
enable = false
folder = "checkpoint"
interval = 10
last_save_model_only = false
export_dtype = "float32"
async_mode = "disabled"  # ["disabled", "async", "async_with_pinned_mem"]

[activation_checkpoint]
mode = "selective"  # ["none", "selective", "full"]
selective_ac_option = '2'  # 'int' = ac every positive int layer or 'op', ac based on ops policy

[compile]
enable=false
components = ["model", "loss"]

[quantize.linear.float8]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false
filter_fqns = ["output"]

[validation]
enable = false
dataset = "c4_validation"
freq = 5
steps = 10

[debug]  #!
seed = 0  #! the same initial weights for any degrees
"""


@needs_torchtitan
def test_stock_llama3_config_gets_cp_dtensor_cp(tmp_path: Path) -> None:
    """A stock torchtitan Llama 3 config (``[model] name = "llama3"``, no ``custom_config_module``, selective
    AC) through our entry point: cp=2 runs cp_dtensor's CP and gives the losses of cp=1, step by step.

    Only the data is overridden on the command line (``synthetic_recall``: no tokenizer, no download).
    Tolerances as in the module docstring: losses within 1e-5 relative (the same fp32 math in another
    order: the ring's log-sum-exp merge, FSDP's sum over the two CP ranks; selective AC recomputes the
    same ops), gradient norms within 2e-4 (torchtitan's fp32 norm over whole tensors vs FSDP shards).
    """
    runs = {}
    for cp in (1, 2):
        config = tmp_path / f"llama3_debug_cp{cp}.toml"
        config.write_text(STOCK_LLAMA3_DEBUG_CONFIG.replace("{cp}", str(cp)))
        dump = tmp_path / f"cp{cp}"
        runs[cp] = dump, _launch(cp, dump, "--training.dataset=synthetic_recall", config=config)
    logs = {}
    for cp, (dump, proc) in runs.items():  # both started: the two runs overlap
        rc = proc.wait(timeout=300)
        logs[cp] = _log_path(dump).read_text()
        assert rc == 0, logs[cp][-4000:]
    for log in logs.values():
        assert 'model.name "llama3" is served by cp_dtensor\'s train spec' in log
        assert "Applied Context Parallel to the model" not in log  # not torchtitan's (PyTorch's) CP
    assert "Applied cp_dtensor context parallelism (cp 2, layout zigzag, comm p2p)" in logs[2]
    assert "Applied cp_dtensor context parallelism" not in logs[1]
    _check_parity(_metrics(runs[1][0]), _metrics(runs[2][0]), steps=3)


@needs_torchtitan
def test_adapter_is_torchtitans_llama3() -> None:
    """TorchtitanLlama3 (cp_dtensor's interface) computes what torchtitan's Transformer computes."""
    from cp_dtensor.integrations import torchtitan as cpt  # first: it makes torchtitan importable on CPU
    from cp_dtensor.layout import sequence_positions

    seq = 64
    adapter = cpt.build_torchtitan_llama3("debugmodel", seq_len=seq)
    adapter.init_weights(seed=0)
    torchtitan_model = importlib.import_module("torchtitan.models.llama3.model.model")
    reference = torchtitan_model.Transformer(adapter.model_args)  # torchtitan's own class
    assert set(reference.state_dict()) == set(adapter.state_dict())  # same parameter names
    reference.load_state_dict(adapter.state_dict())
    tokens = torch.randint(0, adapter.args.vocab_size, (2, seq))
    torch.testing.assert_close(adapter(tokens), reference(tokens), rtol=0, atol=0)
    # A CP rank's shard (zigzag): RoPE at its global positions, as torchtitan's positions argument gives.
    pos = sequence_positions(seq, 1, 2, "zigzag")  # (seq / 2,)
    expected = reference(tokens[:, pos], positions=pos.expand(2, -1))
    torch.testing.assert_close(adapter(tokens[:, pos], pos.expand(2, -1)), expected, rtol=0, atol=0)
    assert adapter.layers["0"].attention.sdpa is adapter.layers["0"].attention.inner_attention


# -- torchtitan's block_causal document mask (Note [block_causal with cp_dtensor]) ------------------------

BLOCK_CAUSAL_CONFIG = ROOT / "train_configs" / "torchtitan" / "llama3_debug_block_causal_cp2.toml"
BYTE_EOS = 257  # the "text" dataset's byte tokenizer: each document is [BOS 256] bytes [EOS 257]


def _rows_with_eos(batch: int, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq) byte tokens with EOS at irregular places: several documents per row, one over the end."""
    tokens = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))
    for b, ends in enumerate(([9, 10, 40, seq // 2 + 3], [0, seq // 3, seq - 1])):
        tokens[b % batch, ends] = BYTE_EOS
    return tokens


@needs_torchtitan
def test_block_causal_document_ids_are_torchtitans() -> None:
    """eos_document_ids numbers documents as torchtitan's mask builder: the same causal-and-same-document mask
    (torchtitan's mask_mods evaluated densely by flex_attention.create_mask, exact)."""
    from cp_dtensor.integrations import torchtitan as cpt  # first: it makes torchtitan importable on CPU

    flex = importlib.import_module("torch.nn.attention.flex_attention")
    tt_attention = importlib.import_module("torchtitan.models.attention")
    seq = 64
    tokens = _rows_with_eos(2, seq, seed=0)
    mask_mod = flex.and_masks(
        tt_attention.get_causal_mask_mod(), tt_attention.get_document_mask_mod(tokens, BYTE_EOS)
    )
    expected = flex.create_mask(mask_mod, 2, None, seq, seq, device="cpu")  # (B, 1, S, S) bool
    ids = cpt.eos_document_ids(tokens, BYTE_EOS)  # (B, S)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()  # (S, S)
    ours = causal & (ids[:, None, :, None] == ids[:, None, None, :])  # (B, 1, S, S)
    assert torch.equal(ours, expected)
    assert ids[0, :12].tolist() == [0] * 10 + [1, 2]  # an EOS closes its own document
    assert int(ids[1].max()) == 2  # an EOS at the last position opens no document


@needs_torchtitan
def test_block_causal_model_is_torchtitans_flex_model() -> None:
    """A block_causal flavor served by cp_dtensor (document attention) computes the logits of torchtitan's own
    FlexAttention model with its own masks, same weights; torchtitan's cannot train on CPU.

    torchtitan's FlexAttention and mask builder are torch.compile'd; they run eagerly here (compiling the block
    mask alone takes ~100 s on 2 CPU cores). Tolerance 1e-5 absolute on logits of magnitude ~5: the same fp32
    math by two kernels (eager flex materializes the masked scores; cp_dtensor's masked op computes only the
    visible blocks with the CPU flash kernel); measured 1.4e-6.
    """
    from types import SimpleNamespace

    from cp_dtensor.integrations import torchtitan as cpt  # first: it makes torchtitan importable on CPU

    seq = 128
    args = cpt.model.llama3_args("debugmodel_flex_attn", max_seq_len=seq, init_seed=0)
    ours = cpt.SeededLlama3(args)
    ours.init_weights()
    reference = importlib.import_module("torchtitan.models.llama3.model.model").Transformer(args)
    reference.load_state_dict(ours.state_dict())
    assert isinstance(ours.layers["0"].attention.inner_attention, cpt.DocumentCausalAttention)
    tokenizer = SimpleNamespace(eos_id=BYTE_EOS)
    tokens = _rows_with_eos(2, seq, seed=1)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = reference(tokens, attention_masks=reference.get_attention_masks(tokens, tokenizer))
        got = ours(tokens, attention_masks=ours.get_attention_masks(tokens, tokenizer))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with (
        torch.compiler.set_stance("force_eager"),
        pytest.raises(NotImplementedError, match="backward on CPU"),
    ):
        reference(tokens, attention_masks=reference.get_attention_masks(tokens, tokenizer))
    # The mask matters: one document per row (no EOS) gives other logits.
    with torch.no_grad():
        no_documents = ours(tokens, attention_masks=torch.zeros_like(tokens, dtype=torch.int32))
    assert (no_documents - got).abs().max() > 1e-2


@needs_torchtitan
def test_block_causal_refusals() -> None:
    """block_causal needs a tokenizer with an EOS id, data with documents, and cp_dtensor's attention under CP."""
    from cp_dtensor.integrations import torchtitan as cpt  # first: it makes torchtitan importable on CPU

    args = cpt.model.llama3_args("debugmodel_varlen_attn", max_seq_len=64, n_layers=1)
    with pytest.raises(ValueError, match="has no eos_id"):
        cpt.SeededLlama3(args).get_attention_masks(torch.zeros(1, 64, dtype=torch.long), None)
    job = importlib.import_module("torchtitan.config").JobConfig()  # torchtitan's, not cp_dtensor's
    job.model.flavor = "debugmodel_flex_attn"
    job.training.dataset = "synthetic_recall"
    with pytest.raises(ValueError, match='synthetic_recall" has no documents'):
        cpt.build_tokenizer(job)
    job.training.dataset = "text"
    assert cpt.build_tokenizer(job).eos_id == BYTE_EOS
    torchtitans_own = importlib.import_module("torchtitan.models.llama3.model.model").Transformer(args)
    with pytest.raises(ValueError, match=r"attends with \['VarlenAttentionWrapper'\]"):
        cpt.apply_cp_dtensor(torchtitans_own, None)  # checked before the mesh is used
    job.parallelism.context_parallel_degree = 2  # torchtitan's varlen refuses CP; cp_dtensor serves it
    args.update_from_config(job)
    assert args.max_seq_len == job.training.seq_len


def _write_corpus(folder: Path, seq_len: int) -> Path:
    """A few kB of JSONL documents (3 to 30 words, fixed seed): packed rows of ``seq_len`` bytes hold several
    documents each, and documents cross the edges of cp=2's zigzag chunks (on average one per row)."""
    rng = random.Random(0)
    words = ("the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "on", "at")
    folder.mkdir()
    with (folder / "documents.jsonl").open("w") as f:
        for _ in range(100):
            f.write(
                json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))}) + "\n"
            )
    dataset = TextDataset(folder, seq_len)
    ids = torch.stack([dataset[i]["document_ids"] for i in range(len(dataset))])  # (N, S)
    assert bool((ids.amax(dim=1) >= 2).all())  # >= 3 documents in every row
    chunk = seq_len // 4  # the zigzag chunks of cp=2: a document over an edge spans two ranks
    assert int((ids[:, chunk - 1 : -1 : chunk] == ids[:, chunk::chunk]).sum()) >= len(dataset)
    return folder


BLOCK_CAUSAL_ARGS = ("--training.seq_len=256", "--training.steps=3")


@pytest.fixture(scope="module")
def block_causal_cp1(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, Callable[[], list[dict]]]]:
    """The block_causal config at cp=1 (one process) on a written corpus, started once: (corpus, metrics).

    cp=1 runs cp_dtensor's document attention too (the exact masked op on one process): torchtitan's own
    FlexAttention has no CPU backward and its varlen no CPU kernel; test_block_causal_model_is_torchtitans_flex_model
    checks that the forward is torchtitan's.
    """
    folder = tmp_path_factory.mktemp("block_causal")
    corpus = _write_corpus(folder / "corpus", seq_len=256)
    dump = folder / "cp1"
    corpus_arg = f"--training.dataset_path={corpus}"
    proc = _launch(
        1,
        dump,
        *BLOCK_CAUSAL_ARGS,
        corpus_arg,
        "--parallelism.context_parallel_degree=1",
        config=BLOCK_CAUSAL_CONFIG,
    )

    def metrics() -> list[dict]:
        rc = proc.wait(timeout=300)
        assert rc == 0, _log_path(dump).read_text()[-4000:]
        return _metrics(dump)

    yield corpus, metrics
    if proc.poll() is None:
        proc.kill()


def _run_block_causal(dump: Path, corpus: Path, *overrides: str) -> tuple[list[dict], str]:
    args = (*BLOCK_CAUSAL_ARGS, f"--training.dataset_path={corpus}", *overrides)
    rc = _launch(2, dump, *args, config=BLOCK_CAUSAL_CONFIG).wait(timeout=300)
    log = _log_path(dump).read_text()
    assert rc == 0, log[-4000:]
    assert "Applied cp_dtensor context parallelism (cp 2, layout zigzag, comm p2p)" in log
    # "text" reads the corpus through the token cache, built by both ranks (Note [Token cache])
    assert len(list((dump / "token_cache").glob("text-*/index.json"))) == 1
    return _metrics(dump), log


@needs_torchtitan
def test_torchtitan_block_causal_cp2_matches_cp1(tmp_path: Path, block_causal_cp1) -> None:
    """torchtitan's block_causal flavor (FlexAttention's, documents end at EOS) under CP through cp_dtensor: cp=2
    (torchtitan's "headtail" balancer = zigzag, the masked ring) gives the losses of cp=1, step by step.

    Tolerances as in the module docstring: losses within 1e-5 relative (the same fp32 math in another order:
    the masked ring's log-sum-exp merge, FSDP's sum over the two CP ranks), gradient norms within 2e-4
    (torchtitan's fp32 norm over whole tensors vs FSDP shards).
    """
    corpus, cp1 = block_causal_cp1
    cp2, _ = _run_block_causal(tmp_path / "cp2", corpus)
    _check_parity(cp1(), cp2, steps=3)


@needs_torchtitan
def test_stock_llama3_varlen_block_causal_cp2_matches_cp1(tmp_path: Path, block_causal_cp1) -> None:
    """torchtitan's own model name "llama3" with its varlen block_causal flavor (which torchtitan refuses under
    CP) through our entry point: served by the same document attention, cp=2 gives the same losses (tolerances
    as above)."""
    corpus, cp1 = block_causal_cp1
    args = ("--model.name=llama3", "--model.flavor=debugmodel_varlen_attn")
    cp2, log = _run_block_causal(tmp_path / "cp2_llama3_varlen", corpus, *args)
    assert 'model.name "llama3" is served by cp_dtensor\'s train spec' in log
    _check_parity(cp1(), cp2, steps=3)


def run_our_trainer(cfg: dict) -> list[float]:
    """cp_dtensor's Trainer on this rank; the per-step global losses."""
    from cp_dtensor.trainer import Trainer

    return [r.loss for r in Trainer(JobConfig.from_dict(cfg)).train()]


def _our_config(dump: Path, **parallelism: int) -> dict:
    return {
        "job": {"dump_folder": str(dump)},
        "model": {"name": "torchtitan.llama3", "flavor": "debugmodel"},
        "training": {"seq_len": 128, "local_batch_size": 2, "steps": 3, "warmup_steps": 1, "lr": 1e-3},
        "parallelism": parallelism,
        "metrics": {"log_freq": 1},
    }


@needs_torchtitan
def test_our_trainer_trains_torchtitan_llama3_with_cp2(tmp_path: Path, dist_pool) -> None:
    """[model] name = "torchtitan.llama3": cp=2 gives the losses of cp=1 (dp=2 over the same global batch)."""
    cp2 = dist_pool(2).run(run_our_trainer, _our_config(tmp_path / "cp2", context_parallel_degree=2))[0]
    dp2_cfg = _our_config(tmp_path / "dp2", data_parallel_degree=2)
    dp2_cfg["training"]["local_batch_size"] = 1  # the same global batch of 2 sequences
    dp2 = dist_pool(2).run(run_our_trainer, dp2_cfg)[0]
    assert cp2 == pytest.approx(dp2, rel=LOSS_RTOL)


@needs_torchtitan
@pytest.mark.slow
def test_our_trainer_trains_torchtitan_llama3_with_tp2_cp2_and_pp2_cp2(tmp_path: Path, dist_pool) -> None:
    """cp_dtensor's TP plan and pipeline split apply to the adapter unchanged: the losses of cp=2 alone."""
    cp2 = dist_pool(2).run(run_our_trainer, _our_config(tmp_path / "cp2", context_parallel_degree=2))[0]
    for name, degree in (("tp2_cp2", "tensor_parallel_degree"), ("pp2_cp2", "pipeline_parallel_degree")):
        cfg = _our_config(tmp_path / name, context_parallel_degree=2, **{degree: 2})
        losses = dist_pool(4).run(run_our_trainer, cfg)[-1]  # the last rank holds the loss under PP
        assert losses == pytest.approx(cp2, rel=LOSS_RTOL), name


@needs_torchtitan
def test_our_trainer_rejects_unknown_torchtitan_flavor(tmp_path: Path) -> None:
    from cp_dtensor.trainer import validate_job

    cfg = JobConfig.from_dict(_our_config(tmp_path))
    cfg.model.flavor = "debugmodel_flex_attn"
    with pytest.raises(
        ValueError, match=r"unknown for model.name .torchtitan.llama3.; choose one of .*SDPA attention"
    ):
        validate_job(cfg, 1)


def test_our_trainer_names_the_extra_when_torchtitan_is_missing(tmp_path: Path, monkeypatch) -> None:
    import cp_dtensor.integrations
    from cp_dtensor.trainer import validate_job

    monkeypatch.setitem(sys.modules, "cp_dtensor.integrations.torchtitan", None)  # import -> ImportError
    monkeypatch.delattr(cp_dtensor.integrations, "torchtitan", raising=False)
    with pytest.raises(ValueError, match=r'pip install "cp_dtensor\[torchtitan\]"'):
        validate_job(JobConfig.from_dict(_our_config(tmp_path)), 1)
