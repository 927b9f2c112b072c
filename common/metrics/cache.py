"""FID/KID feature cache: features of a volume file are computed once per extractor and read back after.

Keyed by the file's content hash (sha256) and the extractor's identity (its name, weight file hash and
options), so the same real set evaluated against another synthetic set, or a copy of a file under another
path, reuses its features; a changed file or extractor gets new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from common.io import DataError, cache_dir, file_hash, torch_load, torch_save


def extractor_key(name: str, weights: str | None = None, options: dict | None = None) -> str:
    """Identity of an extractor: name, content hash of its weight (or TorchScript) file, options."""
    files = [p for p in (weights, name) if p and Path(p).is_file()]
    ident = {"name": Path(name).name if Path(name).is_file() else name,
             "files": [file_hash(p) for p in files], "options": options or {}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


class FeatureCache:
    """``<root>/<extractor key>/<file sha256>[-c<channel>].pt``; hits and misses are counted."""

    def __init__(self, key: str, root: str | os.PathLike | None = None):
        self.folder = Path(root) if root else cache_dir() / "features"
        self.folder = self.folder / key
        self.hits = self.misses = 0
        self._hashes: dict[str, str] = {}

    def _path(self, file: str, channel=None) -> Path:
        if file not in self._hashes:
            self._hashes[file] = file_hash(file)
        suffix = f"-c{int(channel)}" if channel is not None else ""
        return self.folder / f"{self._hashes[file]}{suffix}.pt"

    def get(self, file: str, channel=None) -> torch.Tensor | None:
        path = self._path(file, channel)
        if not path.exists():
            self.misses += 1
            return None
        try:
            value = torch_load(path)
        except DataError:  # a damaged entry is recomputed (and rewritten)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, file: str, features: torch.Tensor, channel=None) -> None:
        torch_save(features.detach().cpu().contiguous(), self._path(file, channel))

    def counts(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "folder": str(self.folder)}
