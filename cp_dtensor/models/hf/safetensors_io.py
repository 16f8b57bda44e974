"""Reading slices of, and writing, HuggingFace safetensors folders (one file, or shards + index).

Note [Reading only the local shard]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``safetensors.safe_open`` maps a file; ``get_slice(key)[rows, cols]`` copies only the requested part into
a tensor, so a rank reads what its DTensor shard holds (DTensor's own local-shape-and-offset rule, the
one DCP uses, covers FSDP2, TP and both together)::

    q_proj (H * D rows) in the file:  | head 0 | head 1 | head 2 | head 3 |
    this rank's rows (FSDP, uneven):           [-----------)
    read:                                   | head 1 | head 2 |   (whole heads: Note [q/k permutation])
    permute inside each head, cut the rank's rows, copy into the local tensor

Pages of a mapped file that are touched count towards a process's RSS until the file is closed, so a load
reads file by file and closes each one when its tensors are done: at most one file's touched pages are
resident at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["INDEX_FILE", "SINGLE_FILE", "HFCheckpointReader", "HFShardWriter", "write_index"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            f'HuggingFace checkpoints need safetensors: pip install "cp_dtensor[hf]" ({e})'
        ) from None
    return safetensors


class HFCheckpointReader:
    """Read tensors or slices of them from a HuggingFace folder (Note [Reading only the local shard]).

    Use as a context manager; the files are opened on first use and closed on exit.

    Args:
        path: Folder with ``model.safetensors``, or shards and ``model.safetensors.index.json``.

    Raises:
        FileNotFoundError: No safetensors file in the folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handles: dict[Path, Any] = {}
        self.bytes_read = 0
        index = self.path / INDEX_FILE
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {key: self.path / name for key, name in weight_map.items()}
            return
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors in {self.path}: a HuggingFace checkpoint folder holds {SINGLE_FILE}, or shards "
                f"with {INDEX_FILE}"
            )
        self._files = {key: file for file in files for key in self._open(file).keys()}  # noqa: SIM118 (a safe_open handle, not a dict)

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open file (drops their memory maps)."""
        for handle in self._handles.values():
            exit_fn = getattr(handle, "__exit__", None)
            if exit_fn is not None:
                exit_fn(None, None, None)
        self._handles.clear()

    def file_of(self, key: str) -> Path:
        """The file that holds a tensor.

        Args:
            key: Tensor name.

        Returns:
            Its file.
        """
        return self._files[key]

    def close_file(self, file: Path) -> None:
        """Close one file (its mapped pages leave this process's RSS); it reopens on the next read.

        Args:
            file: A file of this checkpoint.
        """
        handle = self._handles.pop(file, None)
        exit_fn = getattr(handle, "__exit__", None)
        if exit_fn is not None:
            exit_fn(None, None, None)

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            handle = _safetensors().safe_open(str(file), framework="pt", device="cpu")
            handle = handle.__enter__() if hasattr(handle, "__enter__") else handle
            self._handles[file] = handle
        return handle

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def keys(self) -> Iterator[str]:
        """Every tensor name in the checkpoint."""
        return iter(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, from the file's header (no data is touched).

        Args:
            key: Tensor name.

        Returns:
            The shape.
        """
        return tuple(self._open(self._files[key]).get_slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor ``key``, or the part of it that ``index`` (one slice per leading dim) selects.

        Args:
            key: Tensor name.
            index: Slices, or None for the whole tensor.

        Returns:
            A new tensor in the checkpoint's dtype.
        """
        part = self._open(self._files[key]).get_slice(key)
        tensor = part[index] if index is not None else part[:]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


class HFShardWriter:
    """Writes tensors into safetensors files of at most ``max_shard_bytes`` (one file when they fit).

    Args:
        path: Output folder (created).
        file_stem: Files are called ``{file_stem}-00001.safetensors``, ... .
        max_shard_bytes: Start a new file when the next tensor would pass this size.
    """

    def __init__(
        self, path: str | Path, *, file_stem: str = "model", max_shard_bytes: int = 2 * 2**30
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file_stem = file_stem
        self.max_shard_bytes = max_shard_bytes
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._files = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue a tensor (a contiguous CPU copy is kept); writes the queued file first when it is full.

        Args:
            key: Tensor name in the checkpoint.
            tensor: The whole tensor.
        """
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self.flush()
        self._buffer[key] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        """Write the queued tensors as the next file."""
        if not self._buffer:
            return
        self._files += 1
        name = f"{self.file_stem}-{self._files:05d}.safetensors"
        _safetensors().torch.save_file(self._buffer, str(self.path / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self._buffer, name))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Flush; returns ``{key: file name}`` of everything written."""
        self.flush()
        return self.weight_map


def write_index(path: str | Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """Finish a folder: one file becomes ``model.safetensors``; several get ``model.safetensors.index.json``.

    Args:
        path: The folder.
        weight_map: ``{key: file name}`` of every tensor (from all writers).
        total_bytes: Size of all tensors.
    """
    path = Path(path)
    files = sorted(set(weight_map.values()))
    if len(files) == 1:
        (path / files[0]).replace(path / SINGLE_FILE)
        (path / INDEX_FILE).unlink(missing_ok=True)
        return
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    with open(path / INDEX_FILE, "w") as f:
        json.dump(index, f, indent=2)
