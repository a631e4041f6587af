"""The item catalogue the index is built from: ids, tower features, filterable metadata.

``--items`` is a dataset directory (contracts.dataset) or one items table file
(``.parquet`` / ``.csv``) with the columns the model's feature spec names. Items nobody
interacted with are embedded like any other: the item tower needs only their features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.dataset import load_dataset, table_columns
from contracts.errors import DataError
from contracts.feature_spec import FeatureSpec

METADATA_KINDS = ("categorical", "bag")  # what a filter can match on (category, tags)


@dataclass(frozen=True)
class ItemTable:
    """Columns as NumPy arrays in catalogue order; ``item_ids`` str [n]."""

    spec: FeatureSpec
    columns: dict[str, np.ndarray]

    @property
    def item_ids(self) -> np.ndarray:
        return self.columns[self.spec.columns.item_id].astype(str)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def take(self, rows: np.ndarray) -> ItemTable:
        return ItemTable(self.spec, {name: values[rows] for name, values in self.columns.items()})

    def metadata(self) -> dict[str, np.ndarray]:
        """Item features a server can filter on, by name (the id column excluded)."""
        return {f.name: self.columns[f.name] for f in self.spec.tower("item")
                if f.kind in METADATA_KINDS and f.name != self.spec.columns.item_id}


def load_items(path: str | Path, spec: FeatureSpec) -> ItemTable:
    """Read the item table at ``path`` with the model's feature spec."""
    path = Path(path)
    if path.is_dir():
        items = load_dataset(path).items
        missing = [f.name for f in spec.tower("item") if f.name not in items]
        if missing:
            raise DataError(str(path), f"items lack the model's item features {missing}; was "
                            "the model trained on another feature spec?")
        return ItemTable(spec, {f.name: items[f.name] for f in spec.tower("item")})
    if not path.is_file():
        raise DataError(str(path), "no such file or dataset directory (expected a dataset "
                        "directory or an items .parquet/.csv file)")
    if path.suffix not in (".parquet", ".csv"):
        raise DataError(str(path), f"expected a .parquet or .csv items table (got {path.suffix!r})")
    # The dataset reader's table parser: the same conversions and error messages as training.
    from contracts.dataset import read_table

    return ItemTable(spec, read_table(path, table_columns(spec)["items"], spec))
