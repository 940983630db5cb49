"""Build a tiny, randomly initialised SD1-architecture checkpoint for AUTOMATIC1111 stable-diffusion-webui.

Usage (run with the host's venv; no network needed):

    <webui venv>/bin/python build_tiny_checkpoint.py <data-dir> --webui <webui dir> [--yaml tiny-sd1.yaml] [--seed 0]

Writes  <data-dir>/models/Stable-diffusion/<name>.safetensors  (fp16 state dict of ldm's LatentDiffusion)
and     <data-dir>/models/Stable-diffusion/<name>.yaml         (the config, copied; the host picks a yaml
                                                                  with the checkpoint's basename).

The model is instantiated with the host's own `ldm` code (repositories/stable-diffusion-stability-ai) from the
yaml.  `FrozenCLIPEmbedder.__init__` would download the CLIP-L weights (`CLIPTextModel.from_pretrained`), so
the text encoder is built here from a `CLIPTextConfig` (random weights) and put in place of the cond stage,
frozen exactly as `LatentDiffusion.instantiate_cond_stage` does.  Nothing global is patched.

Every parameter that is all zeros after initialisation (zero_module() outputs, norm biases, ...) is set to
N(0, 0.02) from a fixed seed: otherwise the U-Net output is identically zero, the host's emphasis rescale
divides by ~0 and training goes NaN.
"""
import argparse
import copy
import os
import shutil
import sys

# CLIP ViT-L/14 text encoder (openai/clip-vit-large-patch14 text_config); used when no config is found.
CLIP_L_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
    initializer_range=0.02, initializer_factor=1.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)

DEFAULT_YAML = os.environ.get("TINY_SD_YAML", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-sd1.yaml"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="output data dir; files go to <data_dir>/models/Stable-diffusion/")
    p.add_argument("--yaml", default=DEFAULT_YAML, help="SD1 ldm config (default: %(default)s)")
    p.add_argument("--webui", default=os.environ.get("WEBUI_DIR", os.getcwd()),
                   help="webui dir holding repositories/ (default: $WEBUI_DIR or cwd)")
    p.add_argument("--name", default="tiny", help="checkpoint basename (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="std for re-initialising all-zero parameters")
    p.add_argument("--clip-config", default=None,
                   help="dir or config.json of the CLIP text encoder (default: local HF cache of the yaml's "
                        "`version`, else the built-in CLIP-L text config)")
    p.add_argument("--fp32", action="store_true", help="save float32 instead of float16")
    return p.parse_args(argv)


def setup_host_paths(webui_dir):
    """Put the host's repositories on sys.path like modules/paths.py does (ldm only is needed)."""
    ldm_root = os.path.join(webui_dir, "repositories", "stable-diffusion-stability-ai")
    if not os.path.isfile(os.path.join(ldm_root, "ldm", "models", "diffusion", "ddpm.py")):
        raise SystemExit(f"ldm not found under {ldm_root} (pass --webui <webui dir>)")
    if ldm_root not in sys.path:
        sys.path.insert(0, ldm_root)
    # Same shim as the host's modules/initialize_util.py:fix_pytorch_lightning() (ldm imports the old path).
    if "pytorch_lightning.utilities.distributed" not in sys.modules:
        import pytorch_lightning
        sys.modules["pytorch_lightning.utilities.distributed"] = pytorch_lightning.utilities.rank_zero


def load_text_config(version, clip_config):
    from transformers import CLIPTextConfig
    if clip_config:
        return CLIPTextConfig.from_pretrained(clip_config)
    try:  # offline: only what is already in the local HF cache
        return CLIPTextConfig.from_pretrained(version, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        print(f"no local config for {version} ({type(e).__name__}); using built-in CLIP-L text config")
        return CLIPTextConfig(**CLIP_L_TEXT_CONFIG)


def build_frozen_clip_embedder(params, text_config):
    """A FrozenCLIPEmbedder with random weights, built without from_pretrained (no tokenizer: not saved)."""
    from ldm.modules.encoders.modules import AbstractEncoder, FrozenCLIPEmbedder
    from transformers import CLIPTextModel

    emb = FrozenCLIPEmbedder.__new__(FrozenCLIPEmbedder)
    AbstractEncoder.__init__(emb)
    emb.tokenizer = None
    emb.transformer = CLIPTextModel(text_config)
    emb.device = params.get("device", "cpu")
    emb.max_length = params.get("max_length", 77)
    emb.layer = params.get("layer", "last")
    emb.layer_idx = params.get("layer_idx", None)
    if params.get("freeze", True):
        emb.freeze()
    return emb


def build_model(yaml_path, seed, std, clip_config=None):
    import torch
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    from ldm.models.diffusion.ddpm import disabled_train

    config = OmegaConf.load(yaml_path)
    model_cfg = copy.deepcopy(config.model)
    cond_cfg = model_cfg.params.cond_stage_config
    target = cond_cfg.get("target", "")
    if target != "ldm.modules.encoders.modules.FrozenCLIPEmbedder":
        raise SystemExit(f"expected an SD1 config (FrozenCLIPEmbedder), got cond stage {target!r}")
    cond_params = cond_cfg.get("params", None)
    cond_params = OmegaConf.to_container(cond_params, resolve=True) if cond_params is not None else {}

    torch.manual_seed(seed)
    # Instantiate everything from the yaml except the text encoder (its __init__ downloads weights);
    # a placeholder module takes its place and is swapped out below.
    model_cfg.params.cond_stage_config = OmegaConf.create({"target": "torch.nn.Identity"})
    model = instantiate_from_config(model_cfg)

    text_config = load_text_config(cond_params.get("version", "openai/clip-vit-large-patch14"), clip_config)
    emb = build_frozen_clip_embedder(cond_params, text_config)
    # same as LatentDiffusion.instantiate_cond_stage for a non-trainable cond stage
    model.cond_stage_model = emb.eval()
    model.cond_stage_model.train = disabled_train
    for p in model.cond_stage_model.parameters():
        p.requires_grad = False

    gen = torch.Generator().manual_seed(seed)
    n_fixed = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.is_floating_point() and not torch.any(p):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
                n_fixed += 1
    return config, model, n_fixed


def main(argv=None):
    args = parse_args(argv)
    webui_dir = os.path.abspath(args.webui)
    yaml_path = os.path.abspath(args.yaml)
    out_dir = os.path.join(os.path.abspath(args.data_dir), "models", "Stable-diffusion")
    setup_host_paths(webui_dir)

    import torch
    from safetensors.torch import save_file

    _, model, n_fixed = build_model(yaml_path, args.seed, args.std, args.clip_config)
    dtype = torch.float32 if args.fp32 else torch.float16
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous().clone()

    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, args.name + ".safetensors")
    tmp = ckpt + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, ckpt)
    shutil.copyfile(yaml_path, os.path.join(out_dir, args.name + ".yaml"))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"re-initialised {n_fixed} all-zero parameters; {n_params / 1e6:.1f} M parameters, "
          f"{len(state)} tensors -> {ckpt} ({os.path.getsize(ckpt) / 2**20:.1f} MiB)")
    return ckpt


if __name__ == "__main__":
    main()
