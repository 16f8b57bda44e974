"""Which torchtitan this integration serves, and the error that names the extra when it is missing."""

from __future__ import annotations

import importlib

__all__ = ["EXTRA_HINT", "SUPPORTED_VERSIONS", "require_torchtitan"]

EXTRA_HINT = 'pip install "cp_dtensor[torchtitan]"  (torchtitan>=0.2.2,<0.3)'
"""How to install what this integration needs."""

SUPPORTED_VERSIONS: tuple[tuple[int, int, int], tuple[int, int, int]] = ((0, 2, 2), (0, 3, 0))
"""[min, max) torchtitan version: 0.2.x is the last line with TOML job configs and the train-spec registry."""


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def require_torchtitan() -> None:
    """Import torchtitan and check its version.

    Call it after :func:`~cp_dtensor.integrations.torchtitan.cpu_shims.stub_moe_kernels_without_triton`
    (``import torchtitan`` needs triton otherwise). A source checkout reporting version 0.0.0 is accepted.

    Raises:
        ImportError: torchtitan is missing or outside :data:`SUPPORTED_VERSIONS`; the message says what to
            install.
    """
    try:
        torchtitan = importlib.import_module("torchtitan")
    except ImportError as e:
        raise ImportError(f"cp_dtensor.integrations.torchtitan needs torchtitan: {EXTRA_HINT}. ({e})") from e
    version = _version_tuple(torchtitan.__version__)
    low, high = SUPPORTED_VERSIONS
    if version != (0, 0, 0) and not (low <= version < high):
        raise ImportError(
            f"cp_dtensor.integrations.torchtitan supports torchtitan >=0.2.2,<0.3 (TOML configs, train-spec "
            f"registry); found {torchtitan.__version__}. {EXTRA_HINT}"
        )
