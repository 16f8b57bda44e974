"""Peak RSS per rank while the trainer loads a ~1B-parameter HuggingFace checkpoint, against its size.

    python scripts/measure_hf_load_memory.py [--folder outputs/random_llama_1b] [--dp 2 --cp 2]

1. Writes (once) a random checkpoint in bf16 with Llama 3.2 1B's shapes (hidden 2048, 16 layers, 32 / 8
   heads, SwiGLU 8192, vocab 128,256, tied embeddings: 1.24e9 parameters, 2.47 GB), as sharded safetensors
   with an index, straight from our modules' shapes (no transformers model is ever materialized).
2. Spawns dp x cp ranks that build the trainer (meta-device model -> FSDP2 over dp x cp -> to_empty) and
   load the checkpoint at step 0 (``checkpoint.initial_load_in_hf``: every rank reads only the rows of its
   FSDP shards, Note [Loading a HuggingFace checkpoint into a sharded model]).
3. Each rank reports its RSS (``/proc/self/status``: VmRSS now, VmHWM the peak) after the trainer is built
   and after the load, the bytes it read from the files, and the size of its fp32 shards.

Prints one table; ``--json`` writes the numbers too. The numbers in docs/pretrained.md come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_gib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in GiB."""
    return _status_kib("VmRSS") / 2**20, _status_kib("VmHWM") / 2**20


def write_random_checkpoint(folder: Path, *, max_shard_bytes: int = 1 << 30) -> dict:
    """A random bf16 checkpoint with Llama 3.2 1B's shapes (written tensor by tensor).

    Args:
        folder: Output folder.
        max_shard_bytes: Largest safetensors file.

    Returns:
        ``{"params", "bytes"}``.
    """
    from cp_dtensor.models import ModelArgs, Transformer
    from cp_dtensor.models.hf import (
        LLAMA_ADAPTER,
        HFShardWriter,
        clean_param_name,
        write_hf_config,
        write_index,
    )
    from cp_dtensor.models.rope import RopeScaling

    args = ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_hidden_size=8192,
        rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True, norm_eps=1e-5,
        rope_scaling=RopeScaling("llama3", factor=32.0, original_max_position_embeddings=8192),
    )  # fmt: skip
    with torch.device("meta"):
        model = Transformer(args)
    writer = HFShardWriter(folder, max_shard_bytes=max_shard_bytes)
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        full = torch.randn(p.shape, generator=generator).mul_(0.02).to(torch.bfloat16)
        writer.add(LLAMA_ADAPTER.hf_name(clean_param_name(name)), full)
    write_index(folder, writer.close(), writer.total_bytes)
    write_hf_config(folder, LLAMA_ADAPTER, args, dtype=torch.bfloat16)
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": writer.total_bytes}


def _load_with_dcp(trainer: object, folder: str) -> int:
    """The same tensors through DCP's ``HuggingFaceStorageReader`` (for comparison only: it copies HF rows as
    they are, without the q/k permutation, so the model it fills is not the checkpoint's)."""
    import torch.distributed.checkpoint as dcp

    from cp_dtensor.models.hf import LLAMA_ADAPTER, clean_param_name

    state = {
        LLAMA_ADAPTER.hf_name(clean_param_name(n)): p
        for part in trainer.parallel_model.model_parts
        for n, p in part.named_parameters()
    }
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(folder))
    return 0


def measure_rank(folder: str, dp: int, cp: int, out_dir: str, reader: str = "ours") -> None:
    """On every rank: build the trainer, load the checkpoint, write this rank's numbers.

    Args:
        folder: The checkpoint folder.
        dp: Data-parallel degree.
        cp: Context-parallel degree.
        out_dir: Where ``rank{r}.json`` goes.
        reader: ``"ours"`` (the trainer's load) or ``"dcp"`` (DCP's HuggingFaceStorageReader).
    """
    import torch.distributed as dist

    from cp_dtensor.config import JobConfig
    from cp_dtensor.trainer import Trainer

    rank = dist.get_rank()
    before_build = rss_gib()
    cfg = JobConfig.from_dict(
        {
            "job": {"dump_folder": out_dir},
            "model": {"name": "llama3", "flavor": "hf", "hf_assets_path": folder},
            "training": {"seq_len": 256, "local_batch_size": 1, "steps": 1},
            "parallelism": {"data_parallel_degree": dp, "context_parallel_degree": cp},
            "checkpoint": {"initial_load_in_hf": True},
            "metrics": {"log_freq": 1},
        }
    )
    trainer = Trainer(cfg)
    built = rss_gib()
    shard_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.dtype.itemsize
        for part in trainer.parallel_model.model_parts
        for p in part.parameters()
    )
    dist.barrier()
    t0 = time.perf_counter()
    # ours: what resume() does when there is no checkpoint to resume
    read = _load_with_dcp(trainer, folder) if reader == "dcp" else trainer.load_initial_weights(folder)
    seconds = time.perf_counter() - t0
    loaded = rss_gib()
    record = {
        "rank": rank,
        "rss_start_gib": before_build[0],
        "rss_after_build_gib": built[0],
        "peak_after_build_gib": built[1],
        "rss_after_load_gib": loaded[0],
        "peak_after_load_gib": loaded[1],
        "local_shard_gib": shard_bytes / GIB,
        "read_gib": read / GIB,
        "load_seconds": seconds,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--folder", default="outputs/random_llama_1b", help="checkpoint folder (written once)"
    )
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    parser.add_argument(
        "--reader", default="ours", choices=["ours", "dcp"],
        help="ours: the trainer's sliced safetensors reads; dcp: DCP's HuggingFaceStorageReader (comparison)",
    )  # fmt: skip
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        info = write_random_checkpoint(folder)
        print(f"wrote {folder}: {info['params'] / 1e9:.2f}e9 params, {info['bytes'] / GIB:.2f} GiB in "
              f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    from cp_dtensor.launch import run_distributed

    with tempfile.TemporaryDirectory(prefix="cpd_rss_") as out:
        run_distributed(
            measure_rank, args.dp * args.cp, str(folder), args.dp, args.cp, out, args.reader, timeout_s=1200
        )
        records = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.dp * args.cp)]
    fp32_model = (
        2 * json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    )
    print(f"checkpoint {folder}: {size / GIB:.2f} GiB of safetensors (bf16); the whole model in fp32: "
          f"{fp32_model / GIB:.2f} GiB; dp {args.dp} x cp {args.cp}, FSDP2 over {args.dp * args.cp} ranks; "
          f"reader {args.reader}")  # fmt: skip
    print("rank | RSS start | RSS built | peak built | RSS loaded | peak loaded | fp32 shard | read | load s")
    for r in records:
        print(
            f"{r['rank']:4d} | {r['rss_start_gib']:9.2f} | {r['rss_after_build_gib']:9.2f} | "
            f"{r['peak_after_build_gib']:10.2f} | {r['rss_after_load_gib']:10.2f} | {r['peak_after_load_gib']:11.2f} | "
            f"{r['local_shard_gib']:10.2f} | {r['read_gib']:4.2f} | {r['load_seconds']:6.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_gib": size / GIB, "ranks": records}, indent=1))
    os.sync()


if __name__ == "__main__":
    main()
