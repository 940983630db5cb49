"""Test-only probe extension (linked into a test host by tests/integration/test_prompts.py; never shipped).

While recording, it checks DreamArtist's per-branch routing at the real calls, with the real numbers:
- every U-Net call: each row's branch is read from its cross-attention context (equal to a row of the
  positive conds or of the negative conds that on_cfg_denoiser saw), and the call is run again, inside the
  host, with all rows on the positive adapter, all on the negative one, and on the base weights; the
  differences of the real output to each are recorded per row;
- every text-encoder call: the same with the text-encoder adapters, the branch read from is_negative_prompt.
It also reports the composed adapters' deltas of chosen layers, and can give a batch different prompts per
image (the API takes one prompt), which makes the host's chunks mix cond and uncond rows.
"""

import json
import sys

import torch
from fastapi import FastAPI

from modules import script_callbacks, scripts

STATE = {"recording": False, "busy": False, "layout": None, "unet": [], "text": [], "deltas": {},
         "delta_prefixes": []}
_handles = []


def _adapters():
    module = sys.modules.get("dreamartist_ext.webui.routing")
    return module.active_adapters() if module is not None else None


def _context(cond):
    """The cross-attention context of a conditioning (SDXL's is a dict)."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


def _flat_rows(output):
    """[rows, features] of a text-encoder output (SDXL: context and pooled/size vector side by side)."""
    if isinstance(output, dict):
        return torch.cat([output["crossattn"].flatten(1), output["vector"].flatten(1)], dim=1)
    return output.flatten(1)


def _on_cfg_denoiser(params):
    if STATE["recording"]:
        STATE["layout"] = (_context(params.text_cond).detach().clone(), _context(params.text_uncond).detach().clone())


def _role(context_row):
    cond, uncond = STATE["layout"] or (None, None)
    roles = set()
    for name, rows in (("cond", cond), ("uncond", uncond)):
        if rows is not None and any(r.shape == context_row.shape and torch.equal(r, context_row) for r in rows):
            roles.add(name)
    return roles.pop() if len(roles) == 1 else ("ambiguous" if roles else "unknown")


def _row_differences(actual, reruns):
    rows = []
    for i in range(actual.shape[0]):
        row = {f"d_{label}": float((actual[i] - out[i]).abs().max()) for label, out in reruns.items()}
        row["pos_vs_neg"] = float((reruns["pos"][i] - reruns["neg"][i]).abs().max())
        row["scale"] = float(actual[i].abs().max())
        rows.append(row)
    return rows


def _rerun(module, part, rows_of, call):
    adapters = _adapters()
    STATE["busy"] = True
    try:
        reruns = {}
        for label, rows in (("pos", rows_of("pos")), ("neg", rows_of("neg")), ("base", None)):
            with adapters.routed(part, rows):
                reruns[label] = call()
        return reruns
    finally:
        STATE["busy"] = False


def _record_deltas(adapters):
    if STATE["deltas"] or not STATE["delta_prefixes"]:
        return
    for branch in ("pos", "neg"):
        exported = adapters.export(branch)
        for prefix in STATE["delta_prefixes"]:
            layer = exported.get(prefix)
            if layer is None:
                continue
            delta = layer.up @ layer.down * (layer.alpha / layer.rank)
            STATE["deltas"][f"{branch}:{prefix}"] = {
                "norm": float(delta.norm()), "corner": delta[:4, :4].flatten().tolist(), "rank": layer.rank}


def _after_unet(module, args, kwargs, output):
    if not STATE["recording"] or STATE["busy"]:
        return
    adapters = _adapters()
    x = args[0] if args else kwargs["x"]
    context = kwargs.get("context", args[2] if len(args) > 2 else None)
    entry = {"rows": int(x.shape[0]), "latent_size": int(x.shape[-1]), "context_tokens": int(context.shape[1]),
             "routed": adapters is not None,
             "roles": [_role(context[i]) for i in range(context.shape[0])]}
    if adapters is not None:
        _record_deltas(adapters)
        n = int(x.shape[0])
        reruns = _rerun(module, "unet", lambda b: [b] * n, lambda: module.forward(*args, **kwargs))
        entry["rows_detail"] = _row_differences(output.detach(), reruns)
    STATE["unet"].append(entry)


def _after_text(module, args, output):
    if not STATE["recording"] or STATE["busy"]:
        return
    adapters = _adapters()
    batch = args[0]
    texts = batch["txt"] if isinstance(batch, dict) else batch  # SDXL's conditioner takes a batch dict
    entry = {"texts": list(texts), "negative": bool(getattr(texts, "is_negative_prompt", False)),
             "routed": adapters is not None}
    if adapters is not None:
        n = len(texts)
        reruns = _rerun(module, "te", lambda b: [b] * n, lambda: _flat_rows(module.forward(batch)))
        entry["rows_detail"] = _row_differences(_flat_rows(output).detach(), reruns)
    STATE["text"].append(entry)


def _remove_hooks():
    for handle in _handles:
        handle.remove()
    _handles.clear()


def _on_model_loaded(sd_model):
    _remove_hooks()
    _handles.append(sd_model.model.diffusion_model.register_forward_hook(_after_unet, with_kwargs=True))
    _handles.append(sd_model.cond_stage_model.register_forward_hook(_after_text))


def _on_app_started(_demo, app: FastAPI):
    @app.post("/probe/start")
    def start(body: dict):
        STATE.update(recording=True, layout=None, unet=[], text=[], deltas={},
                     delta_prefixes=list(body.get("delta_prefixes", [])))
        return {"ok": True}

    @app.get("/probe/model")
    def model():
        """What is left on the host's model: peft LoRA layers and forward hooks (ours are the only others)."""
        from peft.tuners.lora import LoraLayer

        from modules import shared

        modules = [shared.sd_model.model.diffusion_model, shared.sd_model.cond_stage_model]
        return {"lora_layers": sum(isinstance(m, LoraLayer) for root in modules for m in root.modules()),
                "adapters_active": _adapters() is not None,
                "hooks": [len(root._forward_pre_hooks) + len(root._forward_hooks) for root in modules]}

    @app.post("/probe/lora-keys")
    def lora_keys(body: dict):
        """Load a LoRA file with the host's own Lora loader: how many of its layers found a module of the loaded
        model (the loader drops the others, logging them only at debug level)."""
        import networks  # the host's extensions-builtin/Lora, on sys.path once it is loaded

        networks.list_available_networks()
        on_disk = networks.available_networks[body["name"]]
        net = networks.load_network(body["name"], on_disk)
        from safetensors import safe_open

        with safe_open(on_disk.filename, framework="pt") as handle:
            layers = {key.split(".")[0] for key in handle.keys()}
        return {"matched": len(net.modules), "file_layers": len(layers), "matched_modules": sorted(net.modules)}

    @app.post("/probe/stop")
    def stop():
        STATE["recording"] = False
        return {"unet": STATE["unet"], "text": STATE["text"], "deltas": STATE["deltas"]}


class ProbePrompts(scripts.Script):
    """``alwayson_scripts: {"dreamartist probe": {"args": ["[\\"prompt 1\\", \\"prompt 2\\"]"]}}`` gives each
    image of the batch its own prompt."""

    def title(self):
        return "dreamartist probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        return [gr.Textbox(value="", visible=False)]

    def before_process(self, p, prompts_json):
        if prompts_json:
            p.prompt = list(json.loads(prompts_json))


script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
script_callbacks.on_model_loaded(_on_model_loaded)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_script_unloaded(_remove_hooks)
