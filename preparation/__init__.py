"""Preparation: the canonical dataset → prepared examples (contracts.prepared), on Apache
Spark (local mode by default, a cluster with ``--master``).

    prepare(data, out, PrepareConfig()) → out

Modules: config (PrepareConfig), session (the Spark session: quiet logs, pinned temp
dirs), inputs (finding and reading the tables, typed and checked), examples (histories,
hold-out, joins), stats (vocabularies, statistics, item counts), shards (bounded,
shuffled Parquet shards), users (what load-features writes), publish (staging and the
atomic rename), job (the steps in order). Imports contracts and pyspark, never the later
stages.
"""

from preparation.config import PrepareConfig
from preparation.job import prepare

__all__ = ["PrepareConfig", "prepare"]
