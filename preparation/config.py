"""PrepareConfig: the options of one preparation run, validated once."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from contracts.errors import ConfigError

_MEMORY = re.compile(r"^[1-9][0-9]*[kmgt]?$", re.IGNORECASE)


@dataclass(frozen=True)
class PrepareConfig:
    rows_per_shard: int = 100_000   # upper bound on the rows of every shard
    shard_multiple: int = 2         # shard counts are a multiple of this (training workers)
    min_count: int = 1              # vocabulary minimum count (non item-tower features)
    history_length: int = 20        # items per user in users/ (what load-features stores)
    max_seen_items: int = 10_000    # hold-out rows' seen_items: the user's latest N items
    seed: int = 0                   # the training shuffle
    master: str = "local[*]"        # Spark master URL
    driver_memory: str = "4g"
    shuffle_partitions: int = 0     # 0: from the data's size

    def __post_init__(self) -> None:
        for name, low in (("rows_per_shard", 1), ("shard_multiple", 1), ("min_count", 1),
                          ("history_length", 1), ("max_seen_items", 1), ("seed", 0),
                          ("shuffle_partitions", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low} (got {value!r})")
        if not _MEMORY.match(self.driver_memory):
            raise ConfigError(f"driver_memory must be a JVM size such as 4g or 512m "
                              f"(got {self.driver_memory!r})")
        if not self.master:
            raise ConfigError("master must be a Spark master URL such as local[*]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
