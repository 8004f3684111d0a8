"""Append-only JSONL caches of paid-for or slow work (LLM replies, generated answers, judge verdicts), so an
interrupted run resumes where it stopped."""
from __future__ import annotations

import os
from pathlib import Path

from paperqa_tune.files import append_jsonl, read_jsonl_tolerant


class JsonlCache:
    """Records keyed by their "key" field, one JSON object a line, flushed as each is written. A kill can tear
    the last line: reading skips it and the next write starts on a line of its own. A later record with the
    same key wins."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self.data = {r["key"]: r for r in read_jsonl_tolerant(self.path) if "key" in r}
        self.loaded = len(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, record: dict) -> None:
        append_jsonl(self.path, record)
        self.data[record["key"]] = record
