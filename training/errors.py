"""Errors of the offline stages (data, training, artifacts).

    TwoTowerError
    ├── FeatureSpecError   a feature spec (TOML) is malformed; names the file and the key
    ├── DataError          an input table is malformed; names the file, line and column
    └── ArtifactError      a model or index artifact is missing, corrupt or mismatched;
                           names the file and what did not match

The retrieval service maps these to gRPC status codes in one place (retrieval.errors).
"""

from __future__ import annotations


class TwoTowerError(Exception):
    """Base of every error this project raises on purpose."""


class FeatureSpecError(TwoTowerError, ValueError):
    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path, self.key = path, key


class DataError(TwoTowerError, ValueError):
    def __init__(
        self, path: str, message: str, *, line: int | None = None, column: str | None = None
    ) -> None:
        where = path
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f": column {column!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.column = path, line, column


class ArtifactError(TwoTowerError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
