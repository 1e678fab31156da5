"""The synthetic pool: every synthesised batch, bounded in memory, spilled to disk when large.

Batches are kept as chunks. The newest chunks stay in memory (on the compute device) up to
``memory_limit_mb``; older ones are written to ``directory`` (one atomic torch file per chunk)
and read back when sampled. :meth:`flush` writes every chunk that is not on disk yet, so a
checkpoint can name the pool by its chunk list (:meth:`state`) and a resumed run rebuilds it
(:meth:`restore`). A pool can be rebuilt from chunk files in another directory than the one it
spills into (under torchrun, ranks other than 0 read rank 0's chunks and spill privately).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from stars_deploy.errors import CheckpointError
from stars_deploy.fileio import load_torch, save_torch

DISK_CACHE_CHUNKS = 4  # spilled chunks kept decoded in memory for sampling
BYTES_PER_MB = 2**20


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class _Chunk:
    index: int
    size: int
    data: torch.Tensor | None  # None once spilled
    path: Path | None  # its file, once written (or restored)


class SyntheticPool:
    def __init__(self, directory: Path, memory_limit_mb: float = 1024.0, device: torch.device | str = "cpu"):
        self.directory = Path(directory)
        self.memory_limit_bytes = memory_limit_mb * BYTES_PER_MB
        self.device = torch.device(device)
        self.chunks: list[_Chunk] = []
        self.memory_bytes = 0  # bytes of the chunks held in memory
        self._disk_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._resident: torch.Tensor | None = None  # every image, when no chunk is spilled

    def __len__(self) -> int:
        return sum(chunk.size for chunk in self.chunks)

    def _path(self, index: int) -> Path:
        return self.directory / f"chunk_{index:06d}.pt"

    @property
    def spilled_chunks(self) -> int:
        return sum(1 for c in self.chunks if c.data is None)

    def add(self, images: torch.Tensor) -> None:
        """Append a batch (B, C, H, W); spill the oldest in-memory chunks beyond the bound."""
        self.chunks.append(_Chunk(len(self.chunks), len(images), images.detach(), None))
        self.memory_bytes += _nbytes(images)
        for chunk in self.chunks[:-1]:
            if self.memory_bytes <= self.memory_limit_bytes:
                break
            if chunk.data is not None:
                self._write(chunk)
                self.memory_bytes -= _nbytes(chunk.data)
                chunk.data = None
                self._resident = None  # release the stacked copy with the spilled chunk

    def _write(self, chunk: _Chunk) -> None:
        if chunk.path is None:
            # clone: a chunk may be a view of the stacked pool, and torch.save keeps whole storages
            save_torch(self._path(chunk.index), chunk.data.cpu().clone())
            chunk.path = self._path(chunk.index)

    def _load(self, chunk: _Chunk) -> torch.Tensor:
        if chunk.data is not None:
            return chunk.data
        if chunk.index not in self._disk_cache:
            self._disk_cache[chunk.index] = load_torch(chunk.path, "pool chunk").to(self.device)
            while len(self._disk_cache) > DISK_CACHE_CHUNKS:
                self._disk_cache.popitem(last=False)
        self._disk_cache.move_to_end(chunk.index)
        return self._disk_cache[chunk.index]

    def _all_resident(self) -> torch.Tensor | None:
        """The whole pool as one tensor on the device while nothing is spilled (the chunks
        become views of it), so a sample is one gather instead of one per chunk; else None."""
        if self.spilled_chunks:
            self._resident = None
            return None
        if self._resident is None or len(self._resident) != len(self):
            self._resident = torch.cat([chunk.data for chunk in self.chunks])
            start = 0
            for chunk in self.chunks:
                chunk.data = self._resident[start:start + chunk.size]
                start += chunk.size
        return self._resident

    def sample(self, count: int) -> torch.Tensor:
        """``count`` images drawn uniformly with replacement from the whole pool."""
        if not self.chunks:
            raise RuntimeError("sampling from an empty synthetic pool")
        resident = self._all_resident()
        if resident is not None:  # drawn on the device: a copy of host indices would wait for the GPU
            return resident[torch.randint(len(resident), (count,), device=self.device)]
        sizes = torch.tensor([c.size for c in self.chunks])
        ends = sizes.cumsum(0)
        picks = torch.randint(int(ends[-1]), (count,))
        owners = torch.searchsorted(ends, picks, right=True)
        offsets = picks - (ends - sizes)[owners]
        parts = torch.empty(count, *self._load(self.chunks[0]).shape[1:], device=self.device)
        for owner in owners.unique().tolist():
            rows = (owners == owner).nonzero().squeeze(1)
            parts[rows.to(self.device)] = self._load(self.chunks[owner])[offsets[rows].to(self.device)]
        return parts

    def flush(self) -> None:
        """Write every chunk not yet on disk (keeping it in memory)."""
        for chunk in self.chunks:
            if chunk.data is not None:
                self._write(chunk)

    def state(self) -> list[int]:
        """Chunk sizes in order; valid after :meth:`flush`."""
        return [chunk.size for chunk in self.chunks]

    def restore(self, sizes: list[int], source: Path | None = None) -> None:
        """Rebuild from a checkpoint's chunk list, loading the newest chunks into memory; the
        chunk files are in ``source`` (default: this pool's directory)."""
        source = Path(source) if source is not None else self.directory
        self.chunks = []
        for index, size in enumerate(sizes):
            path = source / self._path(index).name
            if not path.is_file():
                raise CheckpointError(f"pool chunk {path} is missing: the run cannot resume")
            self.chunks.append(_Chunk(index, size, None, path))
        self.memory_bytes = 0
        for chunk in reversed(self.chunks):
            data = load_torch(chunk.path, "pool chunk").to(self.device)
            if self.memory_bytes + _nbytes(data) > self.memory_limit_bytes and chunk is not self.chunks[-1]:
                break
            chunk.data = data
            self.memory_bytes += _nbytes(data)
