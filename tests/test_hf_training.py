"""The trainer with HuggingFace checkpoints: start from a tiny model that transformers trained on real text,
at every layout; loss-masked SFT; the exported folder.

References:
* step-1 loss (the loss of the first global batch under the loaded weights) = transformers' loss of the
  same model on the same batch. Tolerance 2e-5 relative: fp32, the layouts change only summation orders
  (ring softmax merge, TP partial sums, FSDP); measured at most 8.1e-8 (docs/pretrained.md).
* SFT: the same, with the document mask realized the plain way: transformers runs each packed record as its
  own sequence and the loss is the sum over completion labels / their number (Note [Loss-masked packing]).
* export (checkpoint.last_save_in_hf): transformers loads the folder; the weights written by a pipelined
  run (one writer per stage) equal, as logits in transformers, those of a run without pipelining after the
  same step (2e-4 absolute on logits of magnitude ~10: one AdamW step of lr 1e-3 from equal gradients up
  to fp32 summation order).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from cp_dtensor.config import JobConfig  # noqa: E402
from cp_dtensor.train_step import IGNORE_INDEX  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 2e-5
EXPORT_ATOL = 2e-4


def _make_tiny_model(out: Path, **kwargs: object) -> dict:
    """scripts/make_tiny_hf_model.py's model (60 steps of transformers training), plus the first 300 records
    of its corpora (the trainers below tokenize them on every rank)."""
    spec = importlib.util.spec_from_file_location(
        "make_tiny_hf_model", ROOT / "scripts" / "make_tiny_hf_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stats = module.make_tiny_model(out, steps=60, seq_len=64, **kwargs)
    for name in ("corpus", "sft"):
        lines = (out / f"{name}.jsonl").read_text().splitlines()[:300]
        (out / f"{name}_small.jsonl").write_text("\n".join(lines) + "\n")
    return stats


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {
        "llama": _make_tiny_model(root / "llama", family="llama"),
        "qwen3": _make_tiny_model(root / "qwen3", family="qwen3", tie=True),
    }


def _config(model_dir: str, dump: Path, family: str = "llama3", dataset: str = "text", **par: int) -> dict:
    data = {
        "dataset": dataset,
        "paths": [f"{model_dir}/{'sft' if dataset == 'sft' else 'corpus'}_small.jsonl"],
    }
    return {
        "job": {"dump_folder": str(dump)},
        "model": {
            "name": family,
            "flavor": "hf",
            "hf_assets_path": model_dir,
            "attention_mask": "document_causal" if dataset == "sft" else "causal",
        },
        "training": {"seq_len": 64, "local_batch_size": 4, "global_batch_size": 8, "steps": 1, "lr": 1e-3},
        "parallelism": {"context_parallel_degree": 1, **par},
        "data": data,
        "checkpoint": {"initial_load_in_hf": True},
        "metrics": {"log_freq": 1},
    }


def _with_export(cfg: dict) -> dict:
    cfg["checkpoint"].update(enable=True, interval=1, last_save_in_hf=True)
    return cfg


def run_trainers(cfgs: list[dict]) -> list[float]:
    """Step-1 loss of each config, trained on this rank."""
    from cp_dtensor.trainer import Trainer

    return [Trainer(JobConfig.from_dict(cfg)).train()[0].loss for cfg in cfgs]


def _first_batch(cfg: dict) -> dict[str, torch.Tensor]:
    from cp_dtensor.trainer.builders import _build_data

    job = JobConfig.from_dict(cfg)
    return _build_data(job, 10**6, job.training.global_batch_size).loader.get_batch(0)


@torch.no_grad()
def _transformers_loss(model_dir: str, batch: dict[str, torch.Tensor], per_document: bool) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for row in range(batch["tokens"].shape[0]):
        ids = batch["document_ids"][row] if per_document else torch.zeros_like(batch["tokens"][row])
        for doc in ids.unique().tolist():
            keep = ids == doc
            tokens, labels = batch["tokens"][row][keep], batch["labels"][row][keep]
            logits = hf(tokens[None], position_ids=batch["positions"][row][keep][None]).logits[0]  # (n, V)
            total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


@torch.no_grad()
def _export_logits(folder: Path) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    return hf(ids).logits


def _report(report_dir: Path | None, rows: list[str]) -> None:
    """Append table rows to ``--report-dir``/hf_training.md (docs/pretrained.md quotes them)."""
    if report_dir is not None:
        with open(report_dir / "hf_training.md", "a") as f:
            f.writelines(row + "\n" for row in rows)


def test_step1_loss_equals_transformers_at_every_layout(
    tiny_models, tmp_path: Path, dist_pool, report_dir
) -> None:
    llama, qwen = tiny_models["llama"]["path"], tiny_models["qwen3"]["path"]
    two = {
        "dp2 (cp1)": _with_export(_config(llama, tmp_path / "dp2", data_parallel_degree=2)),
        "cp2": _config(llama, tmp_path / "cp2", context_parallel_degree=2),
    }
    four = {
        "tp2 x cp2": _config(llama, tmp_path / "tp2cp2", context_parallel_degree=2, tensor_parallel_degree=2),
        "dp2 x cp2": _config(llama, tmp_path / "dp2cp2", context_parallel_degree=2, data_parallel_degree=2),
        "pp2 x cp2": _with_export(
            _config(llama, tmp_path / "pp2cp2", context_parallel_degree=2, pipeline_parallel_degree=2)
        ),
        "qwen3 tied, tp2 x cp2": _with_export(
            _config(qwen, tmp_path / "q_tp2cp2", "qwen3", context_parallel_degree=2, tensor_parallel_degree=2)
        ),
        "qwen3 tied, dp2 x cp2": _with_export(
            _config(qwen, tmp_path / "q_dp2cp2", "qwen3", context_parallel_degree=2, data_parallel_degree=2)
        ),
    }
    losses = dict(zip(two, dist_pool(2).run(run_trainers, list(two.values()))[0], strict=True))
    losses.update(zip(four, dist_pool(4).run(run_trainers, list(four.values()))[0], strict=True))
    batch = _first_batch(two["cp2"])  # the same global batch at every layout
    want = {"llama": _transformers_loss(llama, batch, per_document=False)}
    want["qwen3"] = _transformers_loss(qwen, _first_batch(four["qwen3 tied, tp2 x cp2"]), per_document=False)
    # A trained model, not a fresh one: transformers' 60 steps took it well below ln(vocab) = 6.24.
    assert want["llama"] < tiny_models["llama"]["loss_before"] - 1.0
    rows = [f"| transformers, {family} | {loss:.7f} | |" for family, loss in want.items()]
    for layout, loss in losses.items():
        ref = want["qwen3" if layout.startswith("qwen3") else "llama"]
        rows.append(f"| {layout} | {loss:.7f} | {abs(loss - ref) / ref:.1e} |")
    _report(report_dir, rows)
    for layout, loss in losses.items():
        ref = want["qwen3" if layout.startswith("qwen3") else "llama"]
        assert abs(loss - ref) <= LOSS_RTOL * ref, f"{layout}: step-1 loss {loss} vs transformers {ref}"
    # The exports load in transformers, and a pipelined (two writers) or TP-sharded run writes the same
    # weights as one without.
    for a, b in [("pp2cp2", "dp2"), ("q_tp2cp2", "q_dp2cp2")]:
        la = _export_logits(tmp_path / a / "checkpoint" / "step-1-hf")
        lb = _export_logits(tmp_path / b / "checkpoint" / "step-1-hf")
        assert (la - lb).abs().max() <= EXPORT_ATOL, (a, b)
    assert (tmp_path / "pp2cp2" / "checkpoint" / "step-1-hf" / "tokenizer.json").is_file()


def test_sft_loss_counts_completions_only_and_equals_the_reference(
    tiny_models, tmp_path: Path, dist_pool, report_dir
) -> None:
    llama = tiny_models["llama"]["path"]
    cfg = _config(llama, tmp_path / "sft", dataset="sft", context_parallel_degree=2)
    loss = dist_pool(2).run(run_trainers, [cfg])[0][0]
    batch = _first_batch(cfg)
    counted = batch["labels"] != IGNORE_INDEX
    assert 0 < int(counted.sum()) < counted.numel()  # prompts, last tokens and padding are not counted
    want = _transformers_loss(llama, batch, per_document=True)
    _report(
        report_dir,
        [f"| SFT per-record reference (transformers) | {want:.7f} | |",
         f"| SFT cp2, document_causal | {loss:.7f} | {abs(loss - want) / want:.1e} |"],
    )  # fmt: skip
    assert abs(loss - want) <= LOSS_RTOL * want, f"SFT step-1 loss {loss} vs per-record reference {want}"


def test_mismatching_checkpoint_is_refused_in_one_line(tiny_models, tmp_path: Path) -> None:
    from cp_dtensor.trainer import validate_job

    cfg = _config(tiny_models["llama"]["path"], tmp_path)
    cfg["model"]["flavor"] = "debug"  # our debug flavor: vocab 512, width 64 - not the checkpoint's shapes
    cfg["checkpoint"]["initial_load_path"] = tiny_models["llama"]["path"]
    cfg["model"]["hf_assets_path"] = ""
    cfg["data"]["tokenizer"] = tiny_models["llama"]["path"]
    with pytest.raises(ValueError) as err:
        validate_job(JobConfig.from_dict(cfg), 1)
    assert "\n" not in str(err.value)
    assert "in the HuggingFace checkpoint at" in str(err.value) and "llama3/debug" in str(err.value)


def test_weights_only_load_of_a_step_folder_equals_the_hf_export(
    tiny_models, tmp_path: Path, dist_pool
) -> None:
    """checkpoint.initial_load_path without initial_load_in_hf loads a cp_dtensor step folder's weights: the
    same weights as the HF folder written by last_save_in_hf at that step (reference: the step-1 loss of a
    job started from that export; fp32, the same weights and batch, so the same tolerance as above)."""
    llama = tiny_models["llama"]["path"]
    first = _with_export(_config(llama, tmp_path / "a", context_parallel_degree=2))
    from_step = _config(llama, tmp_path / "b", context_parallel_degree=2)
    from_step["checkpoint"] = {"initial_load_path": str(tmp_path / "a" / "checkpoint" / "step-1")}
    from_export = _config(
        str(tmp_path / "a" / "checkpoint" / "step-1-hf"), tmp_path / "c", context_parallel_degree=2
    )
    from_export["data"] = first["data"]  # the same corpus file (the export folder holds only the model)
    losses = dist_pool(2).run(run_trainers, [first, from_step, from_export])[0]
    assert losses[1] != losses[0]  # trained weights, not the initial ones
    assert abs(losses[1] - losses[2]) <= LOSS_RTOL * losses[2], losses
