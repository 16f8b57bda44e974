"""Rotary position embeddings (RoPE) and the scalings used to extend a model's context.

Note [RoPE]
~~~~~~~~~~~
A head of size D is seen as D/2 pairs of dims; pair i of the token at position p is rotated by the angle
``p * inv_freq[i]``. Queries and keys are rotated alike, so their dot product depends on the distance
between the tokens only. cp_dtensor rotates *interleaved* pairs (dims 2i, 2i+1), as Meta's Llama and
torchtitan do (HuggingFace rotates dims i and i + D/2: Note [q/k permutation] in ``cp_dtensor/models/hf``)::

    head dims   0  1 | 2  3 | ...  | D-2 D-1
    pair        i=0  | i=1  | ...  | i=D/2-1
    inv_freq    1    | θ^(-2/D) ...| θ^(-(D-2)/D)      (fast ... slow; wavelength 2π / inv_freq)

The table is computed on the fly from global token positions, since a context-parallel rank holds a
non-contiguous set of positions (zigzag layout). It is a (B, S, D/2, 2) tensor of (cos, sin).

Note [RoPE scaling]
~~~~~~~~~~~~~~~~~~~
To use a model beyond the context L it was trained on, the inverse frequencies are changed; each scaling
below maps the default ``inv_freq`` (``f``) to new ones. ``s`` is the scale factor::

    default   f                                      no change
    linear    f / s                                  every position divided by s (position interpolation)
    dynamic   θ' = θ (s n / L - (s - 1))^(D/(D-2))   NTK-aware: a larger base, only when the sequence
              with n = max(length, L)                length n exceeds L (at n <= L nothing changes)
    llama3    by wavelength λ = 2π / f (Llama 3.1):
                  λ < L / high_freq_factor       ->  f              fast pairs: kept (local order)
                  λ > L / low_freq_factor        ->  f / s          slow pairs: interpolated
                  in between, t = (L/λ - low) / (high - low)  ->  (1 - t) f / s + t f
    yarn      by pair index i, a ramp between two pair indices lo < hi:
                  r(i) = clamp((i - lo) / (hi - lo), 0, 1)   (0 for fast pairs, 1 for slow pairs)
                  f' = f (1 - r) + (f / s) r
              lo, hi = the pairs that turn beta_fast and beta_slow times over L tokens:
                  pair(b) = D ln(L / (2π b)) / (2 ln θ), lo = floor(pair(beta_fast)), hi = ceil(pair(beta_slow))
              and cos, sin are multiplied by the attention factor m = 0.1 ln(s) + 1 (unless given), which
              scales the attention logits by m^2.

    pairs     fast ............................................ slow
    linear    /s   /s   /s   /s   /s   /s   /s   /s   /s   /s   /s
    llama3    1    1    1    1   blend blend /s   /s   /s   /s   /s
    yarn      1    1    1   ramp ramp ramp ramp  /s   /s   /s   /s     (x m on cos, sin)

The frequencies are computed in fp32, as torchtitan and HuggingFace transformers do, so that a converted
checkpoint sees the angles it was trained with (an fp64 computation rounds differently by up to an ulp,
which at position 10^5 moves an angle by ~10^-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

__all__ = [
    "ROPE_TYPES",
    "RopeOverrides",
    "RopeScaling",
    "RotaryEmbedding",
    "apply_rotary_emb",
    "rope_inv_freq",
]

RopeType = Literal["default", "linear", "dynamic", "llama3", "yarn"]
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are scaled beyond the trained context (Note [RoPE scaling]).

    Attributes:
        type: ``"default"`` (none), ``"linear"``, ``"dynamic"`` (NTK-aware), ``"llama3"`` (Llama 3.1) or
            ``"yarn"``.
        factor: Scale factor ``s`` (> 0; 1 for ``"default"``).
        original_max_position_embeddings: The context ``L`` the model was trained on (llama3, yarn,
            dynamic); 0 for ``"default"`` and ``"linear"``.
        low_freq_factor: llama3: pairs with wavelength above ``L / low_freq_factor`` are interpolated.
        high_freq_factor: llama3: pairs with wavelength below ``L / high_freq_factor`` are kept.
        beta_fast: yarn: pairs turning more than this many times over ``L`` tokens are kept.
        beta_slow: yarn: pairs turning fewer times than this are interpolated.
        attention_factor: yarn: multiplier of cos and sin; None means ``0.1 ln(factor) + 1``.
        truncate: yarn: round the ramp's ends to whole pairs (floor / ceil), as the reference does.
        dynamic_seq_len: dynamic: the sequence length ``n`` to scale for; 0 takes ``max(positions) + 1``
            of each forward (one process; under context parallelism every rank must use the same ``n``,
            so the trainer sets it to ``training.seq_len``).
    """

    type: RopeType = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    dynamic_seq_len: int = 0

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(
                f"RoPE scaling type {self.type!r} is not supported; choose one of {list(ROPE_TYPES)}"
            )
        if not self.factor > 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")
        needs_context = self.type in ("dynamic", "llama3", "yarn")
        if needs_context and self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"RoPE scaling {self.type!r} needs original_max_position_embeddings (the trained context) > 0, "
                f"got {self.original_max_position_embeddings}; set it (e.g. 8192 for Llama 3.1)"
            )
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"RoPE scaling 'llama3' needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )
        if self.type == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ValueError(
                f"RoPE scaling 'yarn' needs beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}"
            )
        if self.dynamic_seq_len < 0:
            raise ValueError(
                f"RoPE dynamic_seq_len must be >= 0 (0 = from positions), got {self.dynamic_seq_len}"
            )

    @property
    def cos_sin_scale(self) -> float:
        """Multiplier of cos and sin: yarn's attention factor, 1 for the other types."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    def describe(self) -> str:
        """One line for logs, e.g. ``"llama3 x8 (trained context 8192)"``."""
        if self.type == "default":
            return "default"
        text = f"{self.type} x{self.factor:g}"
        if self.original_max_position_embeddings:
            text += f" (trained context {self.original_max_position_embeddings})"
        return text

    def with_dynamic_seq_len(self, seq_len: int) -> RopeScaling:
        """This scaling with ``dynamic_seq_len`` fixed (no change unless the type is ``"dynamic"``).

        Args:
            seq_len: The sequence length every forward scales for.

        Returns:
            The scaling.
        """
        return replace(self, dynamic_seq_len=seq_len) if self.type == "dynamic" else self


@dataclass(frozen=True)
class RopeOverrides:
    """RoPE settings of a job that replace a model's own (TOML ``[model] rope_*`` / ``--model.rope_*``).

    Zero (or ``""``) keeps the model's value. Naming ``type`` starts a new scaling of that type (its other
    fields from here, ``original_max_position_embeddings`` from the model's scaling or, without one, from its
    max_seq_len); without ``type`` the given fields replace those of the model's scaling.

    Attributes:
        theta: RoPE base.
        type: Scaling type (Note [RoPE scaling]).
        factor: Scale factor.
        original_max_position_embeddings: The trained context.
        low_freq_factor: llama3 only.
        high_freq_factor: llama3 only.
        beta_fast: yarn only.
        beta_slow: yarn only.
        attention_factor: yarn only.
    """

    theta: float = 0.0
    type: str = ""
    factor: float = 0.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    beta_fast: float = 0.0
    beta_slow: float = 0.0
    attention_factor: float = 0.0

    def is_empty(self) -> bool:
        """True when nothing is overridden."""
        return self == RopeOverrides()

    def apply(self, theta: float, scaling: RopeScaling, max_seq_len: int) -> tuple[float, RopeScaling, int]:
        """The model's ``(theta, scaling, max_seq_len)`` with these overrides.

        A scaling that extends the context raises max_seq_len to ``original context x factor`` when that
        is larger.

        Args:
            theta: The model's RoPE base.
            scaling: The model's scaling.
            max_seq_len: The model's longest sequence.

        Returns:
            ``(theta, scaling, max_seq_len)``.

        Raises:
            ValueError: The resulting scaling is invalid (see :class:`RopeScaling`).
        """
        if self.is_empty():
            return theta, scaling, max_seq_len
        names = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                 "beta_fast", "beta_slow", "attention_factor")  # fmt: skip
        given = {n: getattr(self, n) for n in names if getattr(self, n)}
        if self.type and self.type != scaling.type:
            context = scaling.original_max_position_embeddings or max_seq_len
            given.setdefault("original_max_position_embeddings", context)
            new = RopeScaling(type=self.type, **given)  # type: ignore[arg-type]
        else:
            new = replace(scaling, **given)
        if new.type != "default":
            max_seq_len = max(max_seq_len, int(new.original_max_position_embeddings * new.factor))
        return self.theta or theta, new, max_seq_len


def _wavelength_powers(
    head_dim: int, theta: float | torch.Tensor, device: torch.device | None
) -> torch.Tensor:
    """``theta ** (2i / D)`` for i < D/2 in fp32 (the default inverse frequencies are their reciprocals).

    ``theta`` may be a 0-d fp32 tensor (dynamic NTK).
    """
    exponents = torch.arange(0, head_dim, 2, device=device).to(torch.float32) / head_dim  # (D // 2,)
    return theta**exponents  # (D // 2,)


def _yarn_ramp(
    scaling: RopeScaling, head_dim: int, theta: float, device: torch.device | None
) -> torch.Tensor:
    """Per pair, 0 where yarn keeps the frequency and 1 where it interpolates (Note [RoPE scaling])."""
    context = scaling.original_max_position_embeddings

    def pair(turns: float) -> float:
        """The (fractional) pair index that turns ``turns`` times over ``context`` tokens."""
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = pair(scaling.beta_fast), pair(scaling.beta_slow)
    if scaling.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    width = hi - lo if hi != lo else 0.001  # one pair: a step instead of a division by zero
    index = torch.arange(head_dim // 2, dtype=torch.float32, device=device)  # (D // 2,)
    return ((index - lo) / width).clamp(0.0, 1.0)  # (D // 2,)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: RopeScaling = RopeScaling(),
    *,
    seq_len: torch.Tensor | int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Inverse frequencies of the RoPE pairs, scaled as ``scaling`` says (Note [RoPE scaling]).

    Args:
        head_dim: Size D of one attention head (even).
        theta: RoPE base.
        scaling: The scaling.
        seq_len: dynamic only: the sequence length n (an int or a 0-d tensor); None or 0 means no growth
            (the trained context).
        device: Device of the result.

    Returns:
        (D // 2,) fp32 inverse frequencies.
    """
    powers = _wavelength_powers(head_dim, theta, device)  # (D // 2,)
    inv_freq = 1.0 / powers  # (D // 2,)
    s, context = scaling.factor, scaling.original_max_position_embeddings
    if scaling.type == "linear":
        return inv_freq / s
    if scaling.type == "dynamic":
        if seq_len is None or (isinstance(seq_len, int) and seq_len <= context):
            return inv_freq
        n = torch.as_tensor(seq_len, device=device).to(torch.float32).clamp(min=context)  # ()
        base = theta * (s * n / context - (s - 1)) ** (head_dim / (head_dim - 2))  # () fp32
        return 1.0 / _wavelength_powers(head_dim, base, device)
    if scaling.type == "llama3":
        wavelength = 2 * math.pi / inv_freq  # (D // 2,)
        slow = wavelength > context / scaling.low_freq_factor
        fast = wavelength < context / scaling.high_freq_factor
        t = (context / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )  # (D // 2,) blend weight of the kept frequency
        blended = (1 - t) * inv_freq / s + t * inv_freq
        return torch.where(slow, inv_freq / s, torch.where(fast, inv_freq, blended))
    if scaling.type == "yarn":
        ramp = _yarn_ramp(scaling, head_dim, theta, device)  # (D // 2,) 0 = keep, 1 = interpolate
        interpolated = 1.0 / (s * powers)  # f / s
        return inv_freq * (1 - ramp) + interpolated * ramp
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding table computed on the fly from token positions (Note [RoPE]).

    Only the inverse frequencies are stored (a non-persistent buffer, so checkpoints do not carry it).

    Args:
        head_dim: Size of one attention head (even).
        theta: RoPE base.
        scaling: Frequency scaling for context extension (Note [RoPE scaling]).
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("inv_freq", self._compute_inv_freq(device=None), persistent=False)

    def _compute_inv_freq(
        self, device: torch.device | None, seq_len: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if seq_len is None and self.scaling.dynamic_seq_len:
            seq_len = self.scaling.dynamic_seq_len
        return rope_inv_freq(self.head_dim, self.theta, self.scaling, seq_len=seq_len, device=device)

    def reset_parameters(self) -> None:
        """Recompute the inverse frequencies in place (needed after `to_empty` from the meta device)."""
        with torch.no_grad():
            self.inv_freq.copy_(self._compute_inv_freq(device=self.inv_freq.device))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Build the cos/sin table for the given positions.

        Args:
            positions: Integer token positions of shape (B, S) or (1, S).

        Returns:
            Table of shape (B, S, head_dim // 2, 2) holding (cos, sin) in the last dim (times yarn's attention
            factor), in fp32 (fp64 if the module was cast to fp64).
        """
        inv_freq = self.inv_freq
        dynamic = self.scaling.type == "dynamic" and not self.scaling.dynamic_seq_len
        if dynamic or inv_freq.dtype not in (torch.float32, torch.float64):
            # dynamic: the frequencies follow this call's length; a low-precision cast: recompute rather than
            # use rounded frequencies.
            seq_len = positions.max() + 1 if dynamic else None
            inv_freq = self._compute_inv_freq(inv_freq.device, seq_len).to(
                inv_freq.dtype if inv_freq.dtype == torch.float64 else torch.float32
            )
        angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # (B, S, head_dim // 2)
        table = torch.stack((angles.cos(), angles.sin()), dim=-1)  # (B, S, head_dim // 2, 2)
        scale = self.scaling.cos_sin_scale
        return table if scale == 1.0 else table * scale

    def extra_repr(self) -> str:
        """Head size, base and scaling, for ``print(model)``."""
        return f"head_dim={self.head_dim}, theta={self.theta:g}, scaling={self.scaling.describe()}"


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of dims of `x` by the angles in `rope` (real-valued, no complex dtype).

    Args:
        x: Queries or keys of shape (B, S, H, D).
        rope: Table from `RotaryEmbedding`, shape (B, S, D // 2, 2) or (1, S, D // 2, 2).

    Returns:
        Rotated tensor of the same shape and dtype as `x`; the rotation is computed in at least fp32.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(compute_dtype).unflatten(-1, (-1, 2))  # (B, S, H, D // 2, 2)
    x_even, x_odd = pairs[..., 0], pairs[..., 1]  # (B, S, H, D // 2)
    rope = rope.to(compute_dtype)
    cos = rope[..., 0].unsqueeze(2)  # (B, S, 1, D // 2)
    sin = rope[..., 1].unsqueeze(2)  # (B, S, 1, D // 2)
    out_even = x_even * cos - x_odd * sin  # (B, S, H, D // 2)
    out_odd = x_even * sin + x_odd * cos  # (B, S, H, D // 2)
    return torch.stack((out_even, out_odd), dim=-1).flatten(-2).type_as(x)  # (B, S, H, D)
