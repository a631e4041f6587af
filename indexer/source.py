"""Where item embeddings come from, one chunk at a time.

The build never holds the whole embedding matrix: it asks a source for a training sample,
then for the embeddings in row order, chunk by chunk, and adds each chunk to the index.
Memory stays at the index's size plus one chunk.

Sources: ``ArraySource`` (embeddings already in memory), ``NpySource`` (a float32 ``.npy``
on disk, e.g. a model artifact's ``item_embeddings.npy``, read with plain file reads so no
page of it stays mapped), and ``indexer.embed.ItemTowerSource`` (the model's item tower run
over item features).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from contracts.errors import ArtifactError

CHUNK_ROWS = 65536


class EmbeddingSource(Protocol):
    num_items: int
    dim: int

    def sample(self, size: int, seed: int) -> np.ndarray:
        """[min(size, num_items), dim] float32 rows drawn without replacement."""
        ...

    def chunks(self, chunk_size: int) -> Iterator[np.ndarray]:
        """item_emb in row order, [≤ chunk_size, dim] float32 per chunk."""
        ...


def sample_rows(num_items: int, size: int, seed: int) -> np.ndarray:
    """Sorted distinct row numbers, the same for the same (num_items, size, seed)."""
    rng = np.random.default_rng(seed)
    size = min(size, num_items)
    return np.sort(rng.choice(num_items, size, replace=False))


class ArraySource:
    def __init__(self, item_emb: np.ndarray) -> None:
        self._xb = np.ascontiguousarray(item_emb, dtype=np.float32)
        self.num_items, self.dim = self._xb.shape

    def sample(self, size: int, seed: int) -> np.ndarray:
        return self._xb[sample_rows(self.num_items, size, seed)]

    def chunks(self, chunk_size: int) -> Iterator[np.ndarray]:
        for lo in range(0, self.num_items, chunk_size):
            yield self._xb[lo:lo + chunk_size]


class NpySource:
    """A 2-d float32 C-order ``.npy`` file, read chunk by chunk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            try:
                major, _ = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
            except ValueError as exc:
                raise ArtifactError(str(self.path), f"not a .npy file: {exc}") from exc
            self._offset = fh.tell()
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise ArtifactError(str(self.path), "expected a C-order float32 [n, d] array "
                                f"(got shape {shape}, dtype {dtype}, fortran={fortran})")
        self.num_items, self.dim = int(shape[0]), int(shape[1])

    def sample(self, size: int, seed: int) -> np.ndarray:
        """One sequential pass picking the sampled rows (a memory map would pull every
        touched page of the file into this process's resident set)."""
        rows = sample_rows(self.num_items, size, seed)
        parts, first = [], 0
        for chunk in self.chunks(CHUNK_ROWS):
            lo, hi = np.searchsorted(rows, [first, first + len(chunk)])
            parts.append(chunk[rows[lo:hi] - first])
            first += len(chunk)
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def chunks(self, chunk_size: int) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            for lo in range(0, self.num_items, chunk_size):
                rows = min(chunk_size, self.num_items - lo)
                chunk = np.fromfile(fh, dtype=np.float32, count=rows * self.dim)
                if chunk.size != rows * self.dim:
                    raise ArtifactError(str(self.path), f"truncated: ends at row {lo} of "
                                        f"{self.num_items}")
                yield chunk.reshape(rows, self.dim)
