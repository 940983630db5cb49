"""The learned word pair: ``name`` (positive prompt) and ``name-neg`` (negative prompt)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import DiffusionBinding
from .names import negative_name, validate_concept_name

NO_HINT = "*"


@dataclass
class EmbeddingPair:
    name: str
    positive: torch.Tensor  # [n_p, dim]
    negative: torch.Tensor | None  # [n_n, dim]; None in plain textual-inversion mode

    @property
    def negative_name(self) -> str:
        return negative_name(self.name)

    def words(self) -> dict[str, torch.Tensor]:
        """Prompt word -> vectors, as the binding injects them."""
        out = {self.name: self.positive}
        if self.negative is not None:
            out[self.negative_name] = self.negative
        return out

    def trainable(self, device: torch.device) -> "EmbeddingPair":
        """float32 leaf copies on ``device`` that require grad (the optimizer updates these in place)."""

        def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)

        return EmbeddingPair(self.name, leaf(self.positive), leaf(self.negative))


def initial_positive(
    binding: DiffusionBinding, init_text: str, vectors: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``vectors`` rows spread over the tokens of ``init_text`` (e.g. "girl", "red dog").

    ``*`` or blank means no hint: rows are drawn from a normal with the token table's per-dimension mean and std,
    i.e. a plausible but meaningless word.
    """
    if vectors < 1:
        raise ValueError("the positive embedding needs at least 1 vector")
    text = (init_text or "").strip()
    tokens = binding.token_vectors(text) if text and text != NO_HINT else None
    if tokens is None or tokens.shape[0] == 0:
        mean, std = binding.embedding_table_stats()
        noise = torch.randn((vectors, mean.shape[0]), generator=generator, dtype=torch.float32)
        return mean.float().cpu() + std.float().cpu() * noise
    tokens = tokens.float().cpu()
    # Same spreading as the WebUI's own embedding creation: row i takes token i*k//n.
    picks = [i * tokens.shape[0] // vectors for i in range(vectors)]
    return tokens[picks].clone()


def initial_negative(
    binding: DiffusionBinding, vectors: int, noise_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The empty text (end-of-text token) repeated, plus small Gaussian noise (paper, sec. 5.1)."""
    if vectors < 1:
        raise ValueError("the negative embedding needs at least 1 vector")
    eos = binding.end_token_vector().float().cpu()
    noise = torch.randn((vectors, eos.shape[0]), generator=generator, dtype=torch.float32)
    return eos.expand(vectors, -1) + noise_std * noise


def create_pair(
    binding: DiffusionBinding,
    name: str,
    *,
    init_text: str = NO_HINT,
    positive_vectors: int = 3,
    negative_vectors: int = 3,
    negative_noise: float = 1e-3,
    with_negative: bool = True,
    generator: torch.Generator | None = None,
) -> EmbeddingPair:
    validate_concept_name(name)
    positive = initial_positive(binding, init_text, positive_vectors, generator)
    negative = initial_negative(binding, negative_vectors, negative_noise, generator) if with_negative else None
    return EmbeddingPair(name, positive, negative)
