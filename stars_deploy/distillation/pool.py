"""The synthetic pool: every synthesised batch, bounded in memory, spilled to disk when large.

Batches are kept as chunks. The newest chunks stay in memory (on the compute device) up to
``memory_limit_mb``; older ones are written to ``directory`` (one atomic torch file per chunk)
and read back when sampled. :meth:`flush` writes every chunk that is not on disk yet, so a
checkpoint can name the pool by its chunk list (:meth:`state`) and a resumed run rebuilds it
(:meth:`restore`). A pool can be rebuilt from chunk files in another directory than the one it
spills into (under torchrun, ranks other than 0 read rank 0's chunks and spill privately).

A chunk file is ``{"format": POOL_CHUNK_FORMAT, "images": (B, C, H, W) float tensor, "sha256":
hex}`` (torch, weights_only). The checksum (:func:`images_sha256`) is sha256 over
``"<dtype>|<shape tuple>|"`` in UTF-8 followed by the tensor's bytes in C order (the CPU's
little-endian layout). It is stored twice: in the file, and in the checkpoint's chunk list
(:meth:`state` gives ``[{"size", "sha256"}, ...]``), so a bit flip inside a chunk and a chunk
file swapped for another are both refused when the chunk is read, naming the file. Every chunk
is validated the first time this process reads it from disk: a floating 4-D tensor of the size
the checkpoint says, the image shape of the others, finite, its checksum; later reads of a
chunk already verified (sampling a spilled pool reads chunks again and again, and hashing
3 MB costs ~10 ms) check its container and size only. Chunk files of runs checkpointed before checksums (a bare
tensor, sizes without hashes) are still read and validated, but cannot be checked for corruption.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from stars_deploy.errors import CheckpointError
from stars_deploy.fileio import load_torch, save_torch

DISK_CACHE_CHUNKS = 4  # spilled chunks kept decoded in memory for sampling
BYTES_PER_MB = 2**20
POOL_CHUNK_FORMAT = "stars-deploy/pool-chunk-v1"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
RESUME_ADVICE = "the run cannot resume from it: start a new run (or restore the file from a backup)"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def images_sha256(images: torch.Tensor) -> str:
    """The chunk checksum (module docstring) of a batch of images, on any device."""
    data = images.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class _Chunk:
    index: int
    size: int
    data: torch.Tensor | None  # None once spilled
    path: Path | None  # its file, once written (or restored)
    sha256: str | None = None  # of its images: known once written, or from the checkpoint


class SyntheticPool:
    def __init__(self, directory: Path, memory_limit_mb: float = 1024.0, device: torch.device | str = "cpu"):
        self.directory = Path(directory)
        self.memory_limit_bytes = memory_limit_mb * BYTES_PER_MB
        self.device = torch.device(device)
        self.chunks: list[_Chunk] = []
        self.memory_bytes = 0  # bytes of the chunks held in memory
        self._disk_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._resident: torch.Tensor | None = None  # every image, when no chunk is spilled
        self._image_shape: tuple[int, ...] | None = None  # (C, H, W) of the chunks read so far
        self._verified: set[int] = set()  # chunks whose file this process has checked in full

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
            images = chunk.data.cpu().clone()
            chunk.sha256 = images_sha256(images)
            save_torch(self._path(chunk.index), {"format": POOL_CHUNK_FORMAT, "images": images,
                                                 "sha256": chunk.sha256})
            chunk.path = self._path(chunk.index)

    def _read(self, chunk: _Chunk) -> torch.Tensor:
        """The chunk's images from its file, validated (module docstring) before they are used."""
        where = f"pool chunk {chunk.path}"
        payload = load_torch(chunk.path, "pool chunk")
        stored = None
        if isinstance(payload, dict):
            if payload.get("format") != POOL_CHUNK_FORMAT or not isinstance(payload.get("images"), torch.Tensor):
                raise CheckpointError(f"{where} is not a stars-deploy pool chunk (format {POOL_CHUNK_FORMAT} with "
                                      f"'images'); {RESUME_ADVICE}")
            images, stored = payload["images"], payload.get("sha256")
            if not isinstance(stored, str) or not SHA256_HEX.fullmatch(stored):
                raise CheckpointError(f"{where} has no valid sha256; {RESUME_ADVICE}")
        elif isinstance(payload, torch.Tensor):
            images = payload  # written before chunks carried checksums
        else:
            raise CheckpointError(f"{where} holds a {type(payload).__name__}, not images; {RESUME_ADVICE}")
        if images.layout != torch.strided or not images.is_floating_point() or images.dim() != 4:
            raise CheckpointError(f"{where} holds a {images.dtype} tensor of shape {tuple(images.shape)}, not a "
                                  f"(B, C, H, W) batch of float images; {RESUME_ADVICE}")
        if len(images) != chunk.size:
            raise CheckpointError(f"{where} holds {len(images)} images, the checkpoint says {chunk.size}; "
                                  f"{RESUME_ADVICE}")
        if chunk.index in self._verified:
            return images
        if self._image_shape is not None and tuple(images.shape[1:]) != self._image_shape:
            raise CheckpointError(f"{where} holds images of shape {tuple(images.shape[1:])}, the other chunks "
                                  f"{self._image_shape}; {RESUME_ADVICE}")
        digest = images_sha256(images) if stored is not None or chunk.sha256 is not None else None
        for expected, said_by in ((stored, "the file"), (chunk.sha256, "the checkpoint")):
            if expected is not None and digest != expected:
                raise CheckpointError(f"{where}: checksum mismatch: its images hash to sha256 {digest[:12]}..., "
                                      f"{said_by} says {expected[:12]}...; the chunk was modified or corrupted "
                                      f"after it was written: {RESUME_ADVICE}")
        if not bool(torch.isfinite(images).all()):
            raise CheckpointError(f"{where} holds NaN or infinite pixels: the synthesis diverged before it was "
                                  f"saved; {RESUME_ADVICE}")
        self._image_shape = tuple(images.shape[1:])
        chunk.sha256 = digest or chunk.sha256
        self._verified.add(chunk.index)
        return images

    def _load(self, chunk: _Chunk) -> torch.Tensor:
        if chunk.data is not None:
            return chunk.data
        if chunk.index not in self._disk_cache:
            self._disk_cache[chunk.index] = self._read(chunk).to(self.device)
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

    def state(self) -> list[dict]:
        """The chunk list a checkpoint stores: ``{"size", "sha256"}`` per chunk, in order; valid
        after :meth:`flush`."""
        return [{"size": chunk.size, "sha256": chunk.sha256} for chunk in self.chunks]

    def restore(self, entries: list, source: Path | None = None) -> None:
        """Rebuild from a checkpoint's chunk list (:meth:`state`; plain sizes from checkpoints
        written before checksums), loading and validating the newest chunks into memory; the
        chunk files are in ``source`` (default: this pool's directory)."""
        source = Path(source) if source is not None else self.directory
        if not isinstance(entries, list):
            raise CheckpointError(f"the checkpoint's pool list is a {type(entries).__name__}, not a list of chunks; "
                                  f"{RESUME_ADVICE}")
        self.chunks, self._image_shape, self._verified = [], None, set()
        for index, entry in enumerate(entries):
            size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1 or \
                    (isinstance(entry, dict) and not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest))):
                raise CheckpointError(f"the checkpoint's pool entry {index} is {repr(entry)[:80]}, not a chunk size and "
                                      f"sha256; {RESUME_ADVICE}")
            path = source / self._path(index).name
            if not path.is_file():
                raise CheckpointError(f"pool chunk {path} is missing: the run cannot resume")
            self.chunks.append(_Chunk(index, size, None, path, digest))
        self.memory_bytes = 0
        for chunk in reversed(self.chunks):
            data = self._read(chunk).to(self.device)
            if self.memory_bytes + _nbytes(data) > self.memory_limit_bytes and chunk is not self.chunks[-1]:
                break
            chunk.data = data
            self.memory_bytes += _nbytes(data)
