"""The strategy registry: how CP attention moves K/V (or heads) between ranks, one object per strategy.

Note [Strategy registry]
~~~~~~~~~~~~~~~~~~~~~~~~
A strategy is one object that knows everything about itself::

    Strategy
      name, preference            "p2p" ... ; simpler strategies win ties in comm="auto"
      takes_group_size            whether a2a_size is required (hybrid) / accepted
      check(heads, kv_heads, cp, a2a_size) -> reason | None     the one validity rule: the op refuses
                                                                with it and the cost model skips with it
      group_sizes(cp)             the a2a_size values comm="auto" prices
      build(...) -> Algorithm     this rank's forward / backward functions and their plan
      estimate(problem, hw, a2a_size) -> StrategyEstimate       price (cp_dtensor.cost)

The op, the settings' validation, the trainer's checks, the config's choices and ``comm="auto"`` all read
the registry, so a new strategy is one module plus :func:`register_strategy` - from library code or from
a user's (tests/test_strategy_registry.py registers one from the test file). The registry is a table of
code, like torchtitan's train specs, not an option: registering never changes what an existing name does
(re-registering a name raises unless ``replace=True``). The built-ins are registered when the
``cp_dtensor.attention`` package is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cp_dtensor.attention.kernels import AttentionKernel
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.cost.attention import AttentionProblem, StrategyEstimate
from cp_dtensor.cost.hardware import Hardware
from cp_dtensor.layout import LayoutLike

__all__ = [
    "AUTO",
    "Algorithm",
    "Strategy",
    "get_strategy",
    "register_strategy",
    "strategy_names",
]

AUTO = "auto"
"""The strategy name that asks the cost model to choose (``cp_dtensor.attention.choice``)."""


@dataclass(frozen=True, eq=False)
class Algorithm:
    """One call's algorithm on one rank: forward / backward functions and their keyword options.

    ``forward(q, k, v, transport, *, stats, **options) -> (out, lse)``;
    ``backward(dout, q, k, v, out, lse, transport, *, stats, **options) -> (dq, dk, dv)``.
    """

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    options: dict[str, Any]


class Strategy:
    """Base class of the CP strategies (Note [Strategy registry]); subclasses set :attr:`name` and
    implement :meth:`build` and :meth:`estimate`."""

    name: ClassVar[str] = ""
    preference: ClassVar[int] = 100
    takes_group_size: ClassVar[bool] = False

    def check(self, heads: int, kv_heads: int, cp: int, a2a_size: int | None) -> str | None:
        """Why this strategy cannot run with these heads (per rank, after tp) and sizes, or None."""
        return None

    def check_group_size(self, a2a_size: int | None, cp: int | None) -> str | None:
        """Why ``a2a_size`` does not fit this strategy (``cp`` None: not known yet), or None."""
        if a2a_size is not None and not self.takes_group_size:
            return (
                f"a2a_size={a2a_size!r} is only used with comm='hybrid' (strategies that split the CP group into "
                f"all-to-all groups); comm={self.name!r} takes none. Pass comm='hybrid' or leave a2a_size=None."
            )
        return None

    def group_sizes(self, cp: int) -> tuple[int | None, ...]:
        """The ``a2a_size`` values ``comm="auto"`` prices for ``cp`` ranks."""
        return (None,)

    def build(
        self,
        *,
        layout: LayoutLike,
        mask: AttentionMask,
        rank: int,
        cp: int,
        s_local: int,
        a2a_size: int | None,
        scale: float,
        kernel: AttentionKernel,
    ) -> Algorithm:
        """This rank's algorithm for one call (plans are cached by the builders where they are costly)."""
        raise NotImplementedError

    def estimate(
        self, problem: AttentionProblem, hardware: Hardware, a2a_size: int | None
    ) -> StrategyEstimate:
        """Predicted cost of one layer on one rank (forward + backward)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Make ``strategy`` selectable as ``comm=strategy.name`` everywhere (op, settings, config, auto).

    Raises:
        ValueError: an empty name, ``"auto"``, or a name already registered (unless ``replace``).
    """
    name = strategy.name
    if not name or name == AUTO:
        raise ValueError(f"A CP strategy needs a name other than {AUTO!r} and ''; got {name!r}.")
    if name in _STRATEGIES and not replace:
        raise ValueError(
            f"A CP strategy named {name!r} is already registered; pass replace=True to replace it."
        )
    _STRATEGIES[name] = strategy
    return strategy


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names, in registration order (``"auto"`` not included)."""
    return tuple(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; ``ValueError`` listing the choices for an unknown one."""
    try:
        return _STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown CP comm mode {name!r}; expected one of {(*_STRATEGIES, AUTO)}.") from None
