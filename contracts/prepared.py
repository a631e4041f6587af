"""Prepared examples: what ``preparation/`` writes and ``training/`` streams.

Layout of ``<prepared>/`` (published atomically: staged in a hidden directory beside it,
manifest written last, then renamed)::

    manifest.json        format, engine, spec fingerprint and spec, config, source files,
                         splits (shards with row counts), vocabularies, statistics,
                         item counts, users
    train/*.parquet      shuffled (seeded), bounded rows per shard, a multiple of 2 shards
    valid/*.parquet      hold-out rows, with seen_items (every earlier item of the user)
    test/*.parquet
    vocab/<feature>.txt  sorted, one value per line (as np.unique)
    item_counts.parquet  item_id, count over train examples (logQ, corpus sampling)
    users/*.parquet      user_id, user features, history (last L items, most recent first)

Example rows: one column per spec feature (categorical string, "" = missing; numeric
float32, NaN = missing; bag and history list<string>, history most recent first, not
padded), the user id (a string, also when no feature uses it) and the timestamp (int64
seconds). The full description is docs/preparation.md.

This module reads and checks the manifest with no engine and no TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.errors import ArtifactError
from contracts.feature_spec import FeatureSpec, parse_feature_spec
from contracts.model_manifest import MISSING, check_inside, read_json

PREPARED_FORMAT = "two-tower-prepared/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
SEEN_ITEMS = "seen_items"  # hold-out rows only: the user's items before the event
HISTORY = "history"        # users/ rows: the user's last L items, most recent first


@dataclass(frozen=True)
class Shard:
    path: Path   # absolute
    rows: int
    bytes: int


@dataclass(frozen=True)
class Split:
    rows: int
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class PreparedManifest:
    """A prepared directory's manifest; paths are absolute (resolved below ``path``)."""

    path: Path
    format: str
    engine: str
    spec_fingerprint: str
    spec: FeatureSpec
    config: dict[str, Any]
    source: dict[str, Any]
    splits: dict[str, Split]
    vocabularies: dict[str, Path]      # feature → vocab file
    vocabulary_sizes: dict[str, int]
    statistics: dict[str, dict[str, float]]  # numeric feature → count, mean, variance
    item_counts: Path                  # item_counts.parquet
    item_count_examples: int
    users: Path                        # users/ directory
    users_rows: int
    history_length: int
    created: str

    def vocabulary(self, feature: str) -> list[str]:
        """The sorted vocabulary of one categorical or bag feature."""
        path = self.vocabularies[feature]
        try:
            return path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ArtifactError(str(path), f"cannot be read: {exc}") from exc


def spec_fingerprint(spec: FeatureSpec) -> str:
    """sha256 of the spec's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_prepared(directory: str | Path) -> PreparedManifest:
    """The manifest of a prepared directory; ArtifactError naming the manifest when it is
    missing, not JSON, of another format or lacks a field, or names a file outside."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        doc = read_json(path)
    except MISSING as exc:
        raise ArtifactError(str(path), "missing: not a prepared directory (or its "
                            "preparation did not finish); run `two-tower prepare`") from exc
    check_inside(path, directory)
    if not isinstance(doc, dict) or doc.get("format") != PREPARED_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(str(path), f"format must be {PREPARED_FORMAT!r} (got {got!r})")
    try:
        return _parse(directory, doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(str(path), f"malformed manifest: {exc!r}") from exc


def check_spec(manifest: PreparedManifest, spec: FeatureSpec) -> None:
    """Refuse a spec other than the one the shards were prepared with."""
    got = spec_fingerprint(spec)
    if got == manifest.spec_fingerprint:
        return
    changed = _changed_features(manifest.spec.to_dict(), spec.to_dict())
    raise ArtifactError(
        str(manifest.path / MANIFEST),
        f"the feature spec does not match the prepared shards' fingerprint (spec "
        f"{got[:12]}…, shards {manifest.spec_fingerprint[:12]}…; differs in: {changed}); "
        f"prepare again with this spec: two-tower prepare --data DIR --out NEW_DIR",
    )


def _changed_features(old: dict[str, Any], new: dict[str, Any]) -> str:
    names = []
    if old.get("columns") != new.get("columns"):
        names.append("[columns]")
    a, b = old.get("features", {}), new.get("features", {})
    names += [n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
    return ", ".join(names) or "(order of features)"


def _inside(directory: Path, rel: str) -> Path:
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"path {rel!r} is outside the prepared directory")
    return directory / rel


def _parse(directory: Path, doc: dict[str, Any]) -> PreparedManifest:
    path = str(directory / MANIFEST)
    splits = {}
    for name in SPLITS:
        s = doc["splits"][name]
        shards = tuple(Shard(_inside(directory, x["path"]), int(x["rows"]), int(x["bytes"]))
                       for x in s["shards"])
        splits[name] = Split(int(s["rows"]), shards)
    vocab = doc["vocabularies"]
    return PreparedManifest(
        path=directory,
        format=str(doc["format"]),
        engine=str(doc["engine"]),
        spec_fingerprint=str(doc["spec_fingerprint"]),
        spec=parse_feature_spec(doc["spec"], path),
        config=dict(doc["config"]),
        source=dict(doc["source"]),
        splits=splits,
        vocabularies={f: _inside(directory, v["path"]) for f, v in vocab.items()},
        vocabulary_sizes={f: int(v["size"]) for f, v in vocab.items()},
        statistics={f: {k: float(x) for k, x in s.items()}
                    for f, s in doc["statistics"].items()},
        item_counts=_inside(directory, doc["item_counts"]["path"]),
        item_count_examples=int(doc["item_counts"]["examples"]),
        users=_inside(directory, doc["users"]["path"]),
        users_rows=int(doc["users"]["rows"]),
        history_length=int(doc["users"]["history_length"]),
        created=str(doc["created"]),
    )
