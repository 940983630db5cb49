"""Learned concepts on disk: find them, read them, and put several to work at once.

A concept ``name`` is ``name.safetensors`` + ``name-neg.safetensors`` in an embeddings folder and, when it was
trained with adapters, ``name.safetensors`` (positive) + ``name-neg.safetensors`` (negative) in a LoRA folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import files
from .adapters import compose_layers
from .model import NEG, POS
from .names import NEG_SUFFIX, negative_name, validate_concept_name


@dataclass
class Concept:
    name: str
    positive: torch.Tensor
    negative: torch.Tensor | None
    adapters: dict[str, dict[str, files.LoraLayer]] = field(default_factory=dict)  # branch -> kohya layers
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def words(self) -> dict[str, torch.Tensor]:
        out = {self.name: self.positive}
        if self.negative is not None:
            out[negative_name(self.name)] = self.negative
        return out


@dataclass
class ConceptInfo:
    """What listing shows without loading tensors."""

    name: str
    embedding: Path
    negative_embedding: Path | None
    lora: Path | None
    negative_lora: Path | None
    step: int | None
    vectors: int | None
    metadata: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "negative_name": negative_name(self.name),
            "files": {
                "embedding": str(self.embedding),
                "negative_embedding": str(self.negative_embedding) if self.negative_embedding else None,
                "lora": str(self.lora) if self.lora else None,
                "negative_lora": str(self.negative_lora) if self.negative_lora else None,
            },
            "step": self.step,
            "vectors": self.vectors,
            "has_adapters": bool(self.lora or self.negative_lora),
            "metadata": self.metadata,
        }


def _header_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return files.decode_metadata(handle.metadata() or {})


def _find(folder: Path | None, word: str) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    direct = folder / f"{word}.safetensors"
    if direct.is_file():
        return direct
    matches = sorted(folder.rglob(f"{word}.safetensors"))
    return matches[0] if matches else None


def list_concepts(embeddings_dir: Path, lora_dir: Path | None = None) -> list[ConceptInfo]:
    """Every DreamArtist pair in ``embeddings_dir`` (recursively), with its adapters from ``lora_dir``."""
    found = []
    if not embeddings_dir.is_dir():
        return found
    for path in sorted(embeddings_dir.rglob("*.safetensors")):
        if path.stem.endswith(NEG_SUFFIX):
            continue
        try:
            meta = _header_metadata(path)
        except Exception:
            continue
        if meta.get("role") != "positive" or "dreamartist_version" not in meta:
            continue
        neg = path.with_name(f"{negative_name(path.stem)}.safetensors")
        hyper = meta.get("hyperparameters") if isinstance(meta.get("hyperparameters"), dict) else {}
        found.append(ConceptInfo(
            name=path.stem,
            embedding=path,
            negative_embedding=neg if neg.is_file() else None,
            lora=_find(lora_dir, path.stem) if meta.get("adapters") else None,
            negative_lora=_find(lora_dir, negative_name(path.stem)) if meta.get("adapters") else None,
            step=meta.get("step"),
            vectors=hyper.get("positive_vectors"),
            metadata=meta,
        ))
    return found


def load_concept(name: str, embeddings_dir: Path, lora_dir: Path | None = None) -> Concept:
    validate_concept_name(name)
    positive_path = _find(embeddings_dir, name)
    if positive_path is None:
        raise FileNotFoundError(f"no embedding {name}.safetensors in {embeddings_dir}")
    positive, meta = files.load_embedding(positive_path)
    paths = [positive_path]
    negative = None
    negative_path = positive_path.with_name(f"{negative_name(name)}.safetensors")
    if negative_path.is_file():
        negative, _ = files.load_embedding(negative_path)
        paths.append(negative_path)
    adapters = {}
    for branch, word in ((POS, name), (NEG, negative_name(name))):
        lora_path = _find(lora_dir, word)
        if lora_path is not None:
            adapters[branch], _ = files.load_lora(lora_path)
            paths.append(lora_path)
    return Concept(name, positive, negative, adapters, meta, paths)


def composed_adapters(concepts: Sequence[Concept], weights: Mapping[str, float] | None = None
                      ) -> dict[str, dict[str, files.LoraLayer]]:
    """One layer set per branch summing every concept's adapter (times its weight)."""
    weights = weights or {}
    out = {}
    for branch in (POS, NEG):
        weighted = [(c.adapters[branch], weights.get(c.name, 1.0)) for c in concepts if branch in c.adapters]
        if weighted:
            out[branch] = compose_layers(weighted)
    return out


def words_of(concepts: Iterable[Concept]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for concept in concepts:
        out.update(concept.words())
    return out
