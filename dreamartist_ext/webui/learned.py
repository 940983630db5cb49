"""The learned DreamArtist concepts in the host's folders, listed again (and their adapters read again) only when
a file there changes. Read by the prompt script, the batch script, the extra-networks cards and the prompt-words
route, on every generation: a folder listing, not a file read, when nothing changed."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Sequence

from .. import concepts as concept_files
from ..model import NEG, POS
from . import host


def _files_signature(*folders: Path) -> tuple:
    entries = []
    for folder in folders:
        if not folder.is_dir():
            entries.append((str(folder), None))
            continue
        for root, _, names in os.walk(folder, followlinks=True):
            for name in names:
                if name.endswith(".safetensors"):
                    path = os.path.join(root, name)
                    with contextlib.suppress(OSError):
                        stat = os.stat(path)
                        entries.append((path, stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(entries, key=str))


def _stamp(paths: Sequence[Path | None]) -> tuple:
    out = []
    for path in paths:
        if path is not None:
            with contextlib.suppress(OSError):
                out.append((str(path), path.stat().st_mtime_ns))
    return tuple(out)


class LearnedConcepts:
    """The DreamArtist pairs in the host's folders, listed again whenever a file there changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._concepts: dict[str, concept_files.ConceptInfo] = {}
        self._loaded: dict[str, tuple[tuple, concept_files.Concept]] = {}

    def current(self) -> dict[str, concept_files.ConceptInfo]:
        embeddings_dir, lora_dir = host.host_folders()
        signature = _files_signature(embeddings_dir, lora_dir)
        with self._lock:
            if signature != self._signature:
                self._concepts = {info.name: info for info in concept_files.list_concepts(embeddings_dir, lora_dir)}
                self._signature = signature
            return dict(self._concepts)

    def adapters_of(self, info: concept_files.ConceptInfo) -> concept_files.Concept:
        """The concept with the adapters its files hold (read again only when a file changed)."""
        key = _stamp([info.embedding, info.negative_embedding, info.lora, info.negative_lora])
        with self._lock:
            cached = self._loaded.get(info.name)
            if cached is not None and cached[0] == key:
                return cached[1]
        embeddings_dir, lora_dir = host.host_folders()
        concept = concept_files.load_concept(info.name, embeddings_dir, lora_dir)
        listed = {POS: info.lora, NEG: info.negative_lora}
        concept.adapters = {branch: layers for branch, layers in concept.adapters.items() if listed.get(branch)}
        with self._lock:
            self._loaded[info.name] = (key, concept)
        return concept

    def forget(self) -> None:
        with self._lock:
            self._signature = None
            self._concepts.clear()
            self._loaded.clear()


LEARNED = LearnedConcepts()


def has_adapters(info: concept_files.ConceptInfo) -> bool:
    return bool(info.lora or info.negative_lora)
