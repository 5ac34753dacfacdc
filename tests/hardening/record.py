"""Counts what the hardening tests tried, for docs/hardening.md (tests/hardening/report.py).

Each passing case appends one JSON line to ``$DSBUILD_HARDENING_LOG`` (default ``.hardening-log.jsonl`` at the
repository root, ignored by git), so the table is generated from what actually ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def log_path() -> Path:
    return Path(os.environ.get("DSBUILD_HARDENING_LOG", REPO / ".hardening-log.jsonl"))


def add(kind: str, name: str, **figures) -> None:
    with open(log_path(), "a") as f:
        f.write(json.dumps({"kind": kind, "name": name, **figures}) + "\n")
