"""The Spark session of one run: quiet logs (WARN, no progress bars, no UI), temp and
local dirs pinned under a directory the run owns (removed with it), this interpreter for
any Python worker."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from preparation.config import PrepareConfig

log = logging.getLogger("two_tower")
# py4j logs every gateway connection it opens and closes at INFO, the last of them at
# interpreter exit, after the log's stream may be closed: noise, not progress.
logging.getLogger("py4j").setLevel(logging.WARNING)

# Spark's own log4j2 defaults print INFO; these keep WARN and silence three start-up
# warnings that say nothing about the job (hostname, native Hadoop, local.dir override)
# and the query-context logger that repeats an analysis error as a JSON stack trace.
LOG4J2 = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p spark %c{1}: %m%n
logger.native.name = org.apache.hadoop.util.NativeCodeLoader
logger.native.level = error
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
logger.conf.name = org.apache.spark.SparkConf
logger.conf.level = error
logger.context.name = DataFrameQueryContextLogger
logger.context.level = off
"""


def _spark():
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise ImportError("preparation needs Apache Spark: pip install "
                          "'two-tower-retrieval[prepare]' (and a Java 17+ runtime)") from exc
    return SparkSession


@contextlib.contextmanager
def spark_session(config: PrepareConfig, workdir: Path,
                  shuffle_partitions: int) -> Iterator[object]:
    """A SparkSession whose scratch files live in ``workdir``; stopped on exit."""
    builder_cls = _spark()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "log4j2.properties").write_text(LOG4J2)
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    java_opts = (f"-Dlog4j2.configurationFile=file:{workdir / 'log4j2.properties'} "
                 f"-Djava.io.tmpdir={tmp}")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if config.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (builder_cls.builder.master(config.master).appName("two-tower-prepare")
             .config("spark.driver.memory", config.driver_memory)
             .config("spark.driver.extraJavaOptions", java_opts)
             .config("spark.executor.extraJavaOptions", java_opts)
             .config("spark.local.dir", str(workdir / "local"))
             .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
             .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    try:
        yield spark
    finally:
        spark.stop()
