"""Rebuild the toy world's shipped weights (fixed seeds; a GPU is used when there is one):

    python -m dreamartist_ext.toy.pretrain --schedule linear --out /tmp/toy-stage1          # ~45 min on 2 cores
    python -m dreamartist_ext.toy.pretrain --skip-judge --init-from /tmp/toy-stage1/model --out /tmp/toy-stage2 \
        --schedule sd --offset-noise 0.1 --unet-steps 1200 --lr 2e-4 --scenes 20000          # ~10 min
    python -m dreamartist_ext.toy.pretrain --threads 2 --skip-judge --init-from /tmp/toy-stage2/model \
        --out /tmp/toy-stage3 --schedule sd-zero-snr --prediction v_prediction --unet-steps 3000 --lr 3e-4 \
        --scenes 40000                                                                        # ~43 min
    (the first run trains the judge into /tmp/toy-stage1; copy its judge.safetensors into the later --out folders
    first, and ship /tmp/toy-stage3/model with it)

Phases of a run:
1. the VAE (AutoencoderKL, 4x downscale: 64 px <-> 4 x 16 x 16) on fresh renders (skipped with --init-from);
2. the U-Net and the text encoder together on cached latents of pretraining scenes (the held-out pairs never among
   them), captions with parts left out now and then and 10 % empty ones for classifier-free guidance; an
   exponential moving average of the weights is what ships;
3. the judge (shape / colour / background classifier) on fresh renders of every pair.
Why three runs: on SD's schedule the last sampling step still holds sqrt(alpha_bar) = 0.068 of the picture, so
an epsilon model read the background from the seed's noise, not from the prompt (the base model followed a
background prompt in 27 % of pictures, chance 17 %); DDPM's linear schedule (stage 1) and offset noise (stage 2)
only partly fixed that. Stage 3 moves the model to v-prediction on SD's schedule rescaled to zero terminal SNR
(Lin et al. 2023): the last step is pure noise, so only the prompt can choose the background (100 % in
bench/toy_base.py), and the longer training sharpened the shapes (40 % -> 76 %).
The result is an ordinary diffusers folder (fp16 weights) plus judge.safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import JUDGE_FILE, WEIGHTS
from .judge import HEADS, Judge
from .world import HELD_OUT, WORDS, random_scene, render, to_array, training_scene

TOKEN_DIM = 64
MAX_TOKENS = 24
SCALING_FACTOR_FILE = "latent_std"


def build_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..tiny import END, START, vocabulary

    tokens = vocabulary(WORDS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TOKEN_DIM, intermediate_size=4 * TOKEN_DIM, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=len(tokens), max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
        bos_token_id=tokens.index(START), eos_token_id=tokens.index(END), pad_token_id=tokens.index(END)))
    unet = UNet2DConditionModel(
        # Attention at 8x8 and 4x4 only: at 16x16 it would cost five times as much per step on a CPU.
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TOKEN_DIM, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        # Groups of 4+ channels: with one channel per group every norm wiped its mean, and flat colours drifted.
        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=64)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


SCHEDULES = {
    # Stable Diffusion's: the one users' models have
    "sd": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    # DDPM's: sqrt(alpha_bar) at the last step 0.006 instead of 0.068; an epsilon model trained 4000 steps on it
    # overshoots at the first steps (the sampler's latents reached std 8-12), so it is only the first stage
    "linear": dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    # SD's rescaled to zero terminal SNR (Lin et al. 2023): the last step is pure noise, so the prompt alone must
    # choose the background; needs v-prediction, and sampling from the last step ("trailing")
    "sd-zero-snr": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        rescale_betas_zero_snr=True, timestep_spacing="trailing"),
}


def noise_schedule(name: str = "sd", prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **SCHEDULES[name])


def _renders(rng: random.Random, count: int, scene_of=training_scene):
    scenes = [scene_of(rng) for _ in range(count)]
    return scenes, torch.from_numpy(to_array([render(s) for s in scenes]))


def _log(phase: str, step: int, steps: int, started: float, **values) -> None:
    shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    print(f"[{phase}] step {step}/{steps} {shown} ({time.perf_counter() - started:.0f} s)", flush=True)


def train_judge(steps: int, batch: int, seed: int, device: torch.device) -> tuple[Judge, dict]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    judge = Judge().to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        scenes, pixels = _renders(rng, batch, random_scene)  # every pair, the held-out ones too: it is a judge
        _, logits = judge(pixels.to(device))
        loss = sum(F.cross_entropy(logits[key], torch.tensor([labels.index(getattr(s, key)) for s in scenes],
                                                            device=device))
                   for key, labels in HEADS.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            _log("judge", step, steps, started, loss=loss.item())
    return judge.eval(), judge_accuracy(judge, seed + 1, device)


@torch.no_grad()
def judge_accuracy(judge: Judge, seed: int, device: torch.device, count: int = 2000) -> dict:
    """Accuracy per head on fresh renders: all pairs, and the held-out pairs alone."""
    rng = random.Random(seed)
    result = {}
    for part, scene_of in (("all", random_scene),
                           ("held_out", lambda r: random_scene(r, *r.choice(HELD_OUT)))):
        scenes, pixels = _renders(rng, count, scene_of)
        _, logits = judge(pixels.to(device))
        for key, labels in HEADS.items():
            truth = torch.tensor([labels.index(getattr(s, key)) for s in scenes], device=device)
            result[f"{part}_{key}"] = (logits[key].argmax(1) == truth).float().mean().item()
    return result


def train_vae(vae, steps: int, batch: int, seed: int, device: torch.device) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        _, pixels = _renders(rng, batch, random_scene)
        pixels = pixels.to(device)
        posterior = vae.encode(pixels).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        # + the colours of 8x8 patches, weighted up: the world is flat colours, and a drift shows at once
        rec = (F.l1_loss(decoded, pixels) + F.mse_loss(decoded, pixels)
               + 4 * F.l1_loss(F.avg_pool2d(decoded, 8), F.avg_pool2d(pixels, 8)))
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = rec + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            _log("vae", step, steps, started, rec=rec.item(), kl=kl.item())
    vae.eval()
    with torch.no_grad():
        _, pixels = _renders(random.Random(seed + 1), 256, random_scene)
        latents = vae.encode(pixels.to(device)).latent_dist.mean
        decoded = vae.decode(latents).sample.clamp(-1, 1)
        error = (decoded - pixels.to(device)).abs().mean().item() * 127.5
    std = latents.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return {"vae_mean_abs_error_8bit": error, "latent_std": std}


def _caption(scene, rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""  # the unconditional branch of classifier-free guidance
    keep = {part: rng.random() >= 0.15 for part in ("shape", "colour", "background")}
    return scene.caption(**keep)


def train_diffusion(parts: dict, tokenizer, steps: int, batch: int, scenes_count: int, seed: int,
                    device: torch.device, lr: float = 4e-4, ema_decay: float = 0.999, schedule_name: str = "sd",
                    offset_noise: float = 0.0, prediction_type: str = "epsilon") -> dict:
    from ..losses import noised_latents, prediction_target

    rng = random.Random(seed)
    torch.manual_seed(seed)
    unet, vae, text_encoder = parts["unet"].to(device), parts["vae"].to(device), parts["text_encoder"].to(device)
    scheduler = noise_schedule(schedule_name, prediction_type)
    alphas = scheduler.alphas_cumprod.to(device)
    scale = vae.config.scaling_factor
    started = time.perf_counter()
    scenes, latents = [], []
    with torch.no_grad():
        for start in range(0, scenes_count, 256):
            chunk, pixels = _renders(rng, min(256, scenes_count - start))
            scenes += chunk
            latents.append(vae.encode(pixels.to(device)).latent_dist.mean * scale)
    latents = torch.cat(latents)
    print(f"[unet] {len(scenes)} scenes encoded ({time.perf_counter() - started:.0f} s)", flush=True)
    assert not any(s.concept in HELD_OUT for s in scenes)
    trained = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in trained]
    unet.train()
    text_encoder.train()
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    started = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(scenes), (batch,))
        z0 = latents[index]
        ids = tokenizer([_caption(scenes[i], rng) for i in index.tolist()], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids.to(device))[0]
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(z0)
        if offset_noise:  # a per-channel constant too: else at SD's last step the noise's mean leaks the background
            noise = noise + offset_noise * torch.randn(batch, z0.shape[1], 1, 1, device=device)
        alpha_bar = alphas[t]
        noisy = noised_latents(z0, noise, alpha_bar)
        loss = F.mse_loss(unet(noisy, t, context).sample, prediction_target(z0, noise, alpha_bar, prediction_type))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in trained], 1 - decay)
        if step % 100 == 0 or step == steps:
            _log("unet", step, steps, started, loss=loss.item())
    with torch.no_grad():
        for p, e in zip(trained, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return {"unet_steps": steps, "unet_batch": batch, "scenes": len(scenes),
            "unet_seconds": round(time.perf_counter() - started)}


def save_model(parts: dict, folder: Path, schedule_name: str = "sd", prediction_type: str = "epsilon") -> None:
    from ..tiny import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer", words=WORDS, max_length=MAX_TOKENS)
    for name, module in parts.items():
        module.to("cpu").half().save_pretrained(folder / name, safe_serialization=True)
        module.float()
    noise_schedule(schedule_name, prediction_type).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.31.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamartist_ext.toy.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="folder for model/ and judge.safetensors")
    parser.add_argument("--judge-steps", type=int, default=800)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--scenes", type=int, default=40000, help="pretraining scenes for the U-Net")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--skip-judge", action="store_true", help="keep the judge already in --out")
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default="sd", help="noise schedule of the U-Net")
    parser.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="epsilon",
                        help="what the U-Net predicts (a zero-SNR schedule needs v_prediction)")
    parser.add_argument("--offset-noise", type=float, default=0.0, help="std of a per-channel constant added to "
                                                                         "the noise")
    parser.add_argument("--lr", type=float, default=4e-4, help="U-Net and text encoder learning rate")
    parser.add_argument("--init-from", type=Path, help="a model folder to continue from (its VAE is kept)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    from ..files import atomic_write

    started = time.perf_counter()
    report = {"device": str(device), "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    parts = build_components(args.seed)
    if args.init_from:
        for name, module in parts.items():
            module.load_state_dict(type(module).from_pretrained(args.init_from / name).float().state_dict())
    else:
        phase = time.perf_counter()
        report.update(train_vae(parts["vae"], args.vae_steps, 16, args.seed + 10, device))
        report["vae_seconds"] = round(time.perf_counter() - phase)
        print(f"vae: {report}", flush=True)
    folder = args.out / "model"
    from ..tiny import write_tokenizer

    write_tokenizer(folder / "tokenizer", words=WORDS, max_length=MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    report.update(train_diffusion(parts, tokenizer, args.unet_steps, args.unet_batch, args.scenes,
                                  args.seed + 20, device, lr=args.lr, schedule_name=args.schedule,
                                  offset_noise=args.offset_noise, prediction_type=args.prediction))
    save_model(parts, folder, args.schedule, args.prediction)
    if not args.skip_judge:
        phase = time.perf_counter()
        judge, accuracy = train_judge(args.judge_steps, 64, args.seed, device)
        report["judge_accuracy"] = accuracy
        report["judge_seconds"] = round(time.perf_counter() - phase)
        print(f"judge accuracy on fresh renders: {accuracy}", flush=True)
        weights = {k: v.detach().cpu().half().contiguous() for k, v in judge.state_dict().items()}
        atomic_write(args.out / JUDGE_FILE.name, lambda temporary: save_file(weights, str(temporary)))
    elif (args.out / "pretrain-report.json").is_file():  # the kept judge's figures stay in the report
        earlier = json.loads((args.out / "pretrain-report.json").read_text())
        report.update({k: v for k, v in earlier.items() if k.startswith("judge_")})
        if args.init_from:
            report["earlier_stages"] = earlier.get("earlier_stages", []) + [
                {k: v for k, v in earlier.items() if k != "earlier_stages" and not k.startswith("judge_")}]
    report["total_seconds"] = round(time.perf_counter() - started)
    report["command"] = " ".join(["python -m dreamartist_ext.toy.pretrain", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "pretrain-report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
