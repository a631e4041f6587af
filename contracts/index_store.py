"""The index store: version directories and the CURRENT pointer that names the served one.

Written by the index job (indexer.publish: publish, rollback, prune) and read by servers
(retrieval.swap) and loaders; the full publish contract is in indexer.publish's docstring::

    <store>/
      CURRENT          one line: the name of the current version directory
      i-…/             complete, checksummed versions
      .tmp-i-…/        a version being written; never pointed to
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from contracts.errors import ArtifactError
from contracts.model_manifest import MANIFEST

POINTER = "CURRENT"


def resolve_index_dir(path: str | Path) -> Path:
    """A version directory as given, or the version a store's CURRENT names."""
    path = Path(path)
    pointer = path / POINTER
    if not pointer.exists():
        return path
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise ArtifactError(str(pointer), f"must name a version directory (got {name!r})")
    target = path / name
    if not (target / MANIFEST).is_file():
        raise ArtifactError(str(pointer), f"names {name!r}, which is not a complete version "
                            f"in {path}; run `two-tower rollback --store {path}`")
    return target


def current_version(store: str | Path) -> str | None:
    pointer = Path(store) / POINTER
    return pointer.read_text().strip() if pointer.exists() else None


def versions(store: str | Path) -> list[str]:
    """Complete versions in the store, oldest first (by the manifest's created_at)."""
    found = []
    for child in Path(store).iterdir():
        if child.name.startswith(".") or not (child / MANIFEST).is_file():
            continue
        try:
            created = json.loads((child / MANIFEST).read_text())["created_at"]
        except (OSError, ValueError, KeyError):
            continue
        found.append((str(created), child.name))
    return [name for _, name in sorted(found)]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
