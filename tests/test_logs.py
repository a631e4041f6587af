"""Log lines a log pipeline can parse."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from retrieval.logs import JsonFormatter


def test_json_log_format_gives_one_object_per_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "--log-format", "json", "generate", "--out",
         str(tmp_path / "d"), "--users", "30", "--items", "40", "--interactions-per-user", "3"],
        capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "message"} <= set(x) for x in lines)
    assert any("wrote 90 interactions" in x["message"] for x in lines)


def test_request_id_and_traceback_are_fields():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("retrieval.servicer", logging.ERROR, __file__, 1,
                                   "internal error in %s", ("/x",), sys.exc_info())
    record.request_id = "r-42"
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "r-42" and line["message"] == "internal error in /x"
    assert "ValueError: boom" in line["exc"]
