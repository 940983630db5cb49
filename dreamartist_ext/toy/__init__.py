"""A toy text-to-image world the project ships pretrained (issue 11).

64 px pictures of one coloured shape on a plain background, captioned "a red star on a gray background"; some
shape/colour pairs never appear in pretraining and are the concepts a user teaches from one image. The models are
ordinary diffusers components (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer), so training
and generation run through the same binding, trainer and files as a real Stable Diffusion model; a small judge
network tells what a picture shows.

- world.py: the world (shapes, colours, backgrounds, captions, held-out concepts, rendering);
- judge.py: the classifier that grades pictures;
- pretrain.py: rebuilds the shipped weights (``python -m dreamartist_ext.toy.pretrain``);
- demo.py: ``train --demo``: teach a held-out concept, compare with plain textual inversion.
"""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "toy"
MODEL_DIR = WEIGHTS / "model"
JUDGE_FILE = WEIGHTS / "judge.safetensors"
