"""Tensor parallelism for generation: heads and MLP columns over "tp", no sequence parallelism.

Note [Generation TP]
~~~~~~~~~~~~~~~~~~~~
Training's TP plan shards activations along the sequence between blocks (sequence parallelism); a decode
step has one token, which no sequence split can share. Generation uses the plain Megatron plan instead::

    block input (B, S, dim), replicated over tp
      wq, wk, wv, w1, w3   ColwiseParallel   -> local heads / columns (plain tensors)
      attention            local heads: the CP prefill and the sharded KV cache see Hq / tp, Hkv / tp heads
      wo, w2               RowwiseParallel   -> all-reduce over tp, replicated output

so the generation mode (Note [Generation mode]) works on a tp rank's heads unchanged, and its decode
all-gather runs over the cp group only (B x Hq / tp x (D + 1) per rank and layer). Embeddings, norms and the
output head stay replicated. KV heads must divide by tp.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

__all__ = ["apply_tp_for_generation"]


def apply_tp_for_generation(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard ``model``'s attention heads and MLP columns over the 1-D ``tp_mesh`` (Note [Generation TP]).

    Args:
        model: a ``cp_dtensor.models`` decoder with full weights on every rank.
        tp_mesh: the 1-D tensor-parallel mesh.

    Raises:
        ValueError: heads or KV heads that ``tp`` does not divide.
    """
    tp = tp_mesh.size()
    args = model.args
    if args.n_heads % tp or args.kv_heads % tp:
        raise ValueError(
            f"generation TP over {tp} ranks needs it to divide the {args.n_heads} query heads and the "
            f"{args.kv_heads} KV heads; use a tp that divides both."
        )
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan)
    return model
