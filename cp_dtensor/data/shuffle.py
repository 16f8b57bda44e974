"""A seeded permutation of ``range(n)`` evaluated per index, in O(1) memory whatever ``n`` is.

Note [Index permutation without a table]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``torch.randperm(n)`` holds 8 bytes per sample: 4 GB for the 500M windows of a 1 TB corpus, on every
rank, rebuilt each epoch. Instead a small block cipher maps indices to indices. A balanced Feistel network
over ``2h`` bits is a bijection of ``[0, 4^h)`` for any round function; cycle walking (apply it again while
the result is ``>= n``) restricts it to a bijection of ``[0, n)``, since ``4^h < 4 n`` needs fewer than 4
passes on average::

    x (2h bits) = L | R                     round r (4 rounds):  L, R  <-  R, L xor F_r(R)
                                            F_r(R) = mix64(R xor key_r) mod 2^h
    i -> feistel(i) -> ... (while >= n) -> p(i)      keys: key_r = hash(seed, epoch, r)

Every rank computes only the indices of its own rows, the permutation depends only on ``(seed, epoch, n)``
and a checkpoint needs no table: the batch number alone says where the loader is.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["permute_indices"]

_ROUNDS = 4
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _key(*parts: int | str) -> np.uint64:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast 64-bit mixing function (uint64 arithmetic wraps modulo 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute_indices(indices: np.ndarray, n: int, *, seed: int, epoch: int) -> np.ndarray:
    """``p(indices)`` for the permutation ``p`` of ``range(n)`` that ``(seed, epoch)`` selects.

    See Note [Index permutation without a table].

    Args:
        indices: (K,) integers in ``[0, n)``.
        n: Size of the permuted range (>= 1).
        seed: Shuffling seed.
        epoch: Epoch number; each epoch has its own permutation.

    Returns:
        (K,) int64: the permuted indices (distinct for distinct inputs).

    Raises:
        ValueError: For ``n < 1`` or an index outside ``[0, n)``.
    """
    if n < 1:
        raise ValueError(f"permute_indices: n must be >= 1, got {n}")
    x = np.asarray(indices, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"permute_indices: indices must lie in [0, {n}), got [{x.min()}, {x.max()}]")
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # 2 * half bits cover [0, n)
    low = np.uint64((1 << half) - 1)
    keys = [_key("loader-epoch", seed, epoch, r) for r in range(_ROUNDS)]
    out = x.astype(np.uint64)
    pending = np.ones(out.shape, dtype=bool)
    while pending.any():
        v = out[pending]
        left, right = v >> np.uint64(half), v & low
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & low)
        v = (left << np.uint64(half)) | right
        out[pending] = v
        pending[pending] = v >= np.uint64(n)  # cycle walking: stay inside [0, n)
    return out.astype(np.int64)
