"""The judge: a small CNN that tells a toy picture's shape, colour and background.

It grades generated pictures (does the learned word draw the concept? is the prompt's background there?) and
gives a feature vector in which distances and variances measure fidelity and diversity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .world import BACKGROUNDS, COLOURS, SHAPES, to_array

HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
FEATURES = 128


class Judge(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.MaxPool2d(2))

        self.trunk = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 128),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({key: nn.Linear(FEATURES, len(labels)) for key, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """pixels [N, 3, 64, 64] in [-1, 1] -> (features [N, FEATURES], logits per head)."""
        features = self.trunk(pixels)
        return features, {key: head(features) for key, head in self.heads.items()}


@dataclass
class Verdict:
    """What the judge saw in each picture: labels per head, and the features."""

    labels: dict[str, list[str]]
    features: np.ndarray  # [N, FEATURES]

    def share(self, head: str, label: str) -> float:
        values = self.labels[head]
        return sum(v == label for v in values) / max(1, len(values))

    def concept_share(self, shape: str, colour: str) -> float:
        hits = [s == shape and c == colour for s, c in zip(self.labels["shape"], self.labels["colour"])]
        return sum(hits) / max(1, len(hits))


def load_judge(path: str | Path) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return judge.eval()


@torch.no_grad()
def judge_images(judge: Judge, images) -> Verdict:
    """Grade PIL images (any size is resized to 64 px)."""
    from .world import SIZE

    pixels = torch.from_numpy(to_array([im.convert("RGB").resize((SIZE, SIZE)) for im in images]))
    features, logits = judge(pixels)
    labels = {key: [HEADS[key][i] for i in out.argmax(1).tolist()] for key, out in logits.items()}
    return Verdict(labels, features.numpy())
