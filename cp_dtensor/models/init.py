"""Deterministic parameter initialization that does not depend on how a model is sharded.

Note [Seeded init]
~~~~~~~~~~~~~~~~~~
Every parameter is drawn from its own generator, seeded by (model seed, structural name), as the full
unsharded tensor, and then sliced to the local shard::

    seed, "layers.3.attention.wq.weight" -> blake2b -> Generator -> full tensor (fp32) -> this rank's slice

so the same seed gives the same full weights whether the model is whole, FSDP/TP-sharded or split into
pipeline stages (stages delete layers; the other layers' draws do not change).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["copy_full_into_", "init_ones_", "init_trunc_normal_", "local_device", "param_seed"]


def param_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from the model seed and a parameter's structural name.

    Args:
        seed: The model seed.
        key: The parameter's structural name, e.g. ``"layers.3.attention.wq.weight"``.

    Returns:
        The seed.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def local_device(param: torch.Tensor) -> torch.device:
    """Device of the data behind `param` (the local shard's device for a DTensor).

    Args:
        param: A tensor or DTensor.

    Returns:
        The device.
    """
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.device


def init_trunc_normal_(param: torch.Tensor, std: float, key: str, seed: int | None) -> None:
    """Fill `param` with a normal(0, std) truncated at +-3 std.

    With `seed=None` the global RNG is used (for DTensors, DTensor's own RNG tracker keeps sharded results
    equal to the full tensor). With a seed, the full tensor is drawn in fp32 from a generator seeded by
    (seed, key) on the parameter's device type and then sliced to the local shard, so the weights do not
    depend on how the model is sharded, on the parameter dtype (up to rounding), nor on which other
    parameters exist (pipeline stages delete layers).

    Args:
        param: The parameter (plain or DTensor), allocated.
        std: Standard deviation.
        key: Structural name (part of the per-parameter seed).
        seed: Model seed, or None for the global RNG.

    Raises:
        RuntimeError: The parameter is on the meta device.
    """
    if seed is None:
        nn.init.trunc_normal_(param, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return
    device = local_device(param)
    if device.type == "meta":
        raise RuntimeError(
            f"cannot initialize {key}: it lives on the meta device; call model.to_empty(device=...) "
            f"before init_weights()"
        )
    generator = torch.Generator(device=device)
    generator.manual_seed(param_seed(seed, key))
    full = torch.empty(param.shape, dtype=torch.float32, device=device)
    nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
    copy_full_into_(param, full)


def init_ones_(param: torch.Tensor) -> None:
    """Fill `param` with ones (works for plain tensors and DTensors).

    Args:
        param: The parameter.
    """
    nn.init.ones_(param)


def copy_full_into_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full (unsharded) tensor `full` into `param`, slicing it if `param` is a DTensor.

    Args:
        param: The destination (plain or DTensor).
        full: The whole tensor, the same on every rank.
    """
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the same full tensor, slice locally without communication.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
