"""The index store: version directories and the CURRENT pointer that names the served one.

Written by the index job (indexer.publish: publish, rollback, prune) and read by servers
(retrieval.swap) and loaders; the full publish contract is in indexer.publish's docstring::

    <store>/
      CURRENT          one line: the name of the current version directory
      i-…/             complete, checksummed versions
      .tmp-i-…/        a version being written; never pointed to
"""

from __future__ import annotations

import os
from pathlib import Path

from contracts.errors import ArtifactError
from contracts.model_manifest import MANIFEST, MISSING, check_inside, read_json, read_regular

POINTER = "CURRENT"
POINTER_MAX_BYTES = 4096  # a version name and a newline; anything longer is not a pointer


def resolve_index_dir(path: str | Path) -> Path:
    """A version directory as given, or the version a store's CURRENT names.

    Raises ArtifactError naming CURRENT when it cannot be read or names no complete version,
    and naming the version directory when it is a symbolic link that leads out of the store."""
    path = Path(path)
    name = current_version(path)
    if name is None:
        return path
    pointer = path / POINTER
    if not name or "/" in name or "\\" in name or name.startswith(".") or not name.isprintable():
        raise ArtifactError(str(pointer), f"must name a version directory (got {name[:80]!r})")
    target = path / name
    check_inside(target, path, "the index store")
    if not (target / MANIFEST).is_file():
        raise ArtifactError(str(pointer), f"names {name!r}, which is not a complete version "
                            f"in {path}; run `two-tower rollback --store {path}`")
    return target


def current_version(store: str | Path) -> str | None:
    """What the store's CURRENT names (stripped), None when there is no CURRENT; ArtifactError
    naming CURRENT when it is not a regular file of UTF-8 text."""
    pointer = Path(store) / POINTER
    try:
        data = read_regular(pointer, POINTER_MAX_BYTES)
    except MISSING:
        if pointer.is_symlink():
            raise ArtifactError(str(pointer), f"is a symbolic link to nothing; {_fix(store)}"
                                ) from None
        return None
    except ArtifactError as exc:
        raise ArtifactError(str(pointer), f"{_reason(exc)}; {_fix(store)}") from exc
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ArtifactError(str(pointer), f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                            f"offset {exc.start}); {_fix(store)}") from exc


def _reason(exc: ArtifactError) -> str:
    return str(exc).removeprefix(f"{exc.path}: ")


def _fix(store: str | Path) -> str:
    return (f"it must hold one line, a version name: run `two-tower rollback --store {store} "
            f"--to VERSION`")


def versions(store: str | Path) -> list[str]:
    """Complete versions in the store, oldest first (by the manifest's created_at). A version
    whose manifest cannot be read, or whose directory links out of the store, is left out."""
    store = Path(store)
    try:
        children = list(store.iterdir())
    except OSError as exc:
        raise ArtifactError(str(store), f"cannot list the index store: {exc.strerror or exc}"
                            ) from exc
    found = []
    for child in children:
        if child.name.startswith(".") or not (child / MANIFEST).is_file():
            continue
        try:
            check_inside(child, store, "the index store")
            created = read_json(child / MANIFEST)["created_at"]
        except (ArtifactError, OSError, KeyError, TypeError):
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
