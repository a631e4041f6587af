"""Staging and the atomic publish: a run writes into a hidden directory beside ``out``
(the same filesystem, so publishing is one rename), the manifest last; a killed run leaves
only that hidden directory, never ``out``, and a failed one removes it."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from contracts.errors import ConfigError
from contracts.prepared import MANIFEST, PREPARED_FORMAT


def refuse_existing(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out}: already exists; prepared output is never overwritten: "
                          "prepare into a new directory (or remove this one)")


def new_stage(out: Path) -> Path:
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.staging-{secrets.token_hex(4)}"
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest (fsynced), then rename ``stage`` to ``out``."""
    doc = {"format": PREPARED_FORMAT, **manifest,
           "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    tmp = stage / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)  # in order: the spec's features keep theirs
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, stage / MANIFEST)
    refuse_existing(out)  # appeared while the job ran
    os.rename(stage, out)
    return out


def abandon(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
