"""The "DreamArtist" sub-tab of the WebUI's Train tab.

Built inside the host's ``on_ui_train_tabs`` callback. Every option's default and most labels come from
``TrainConfig`` (the single source of truth); the form keeps its components keyed by config field so the values
the Train button sends are mapped back to a ``TrainConfig`` by name, not by position. Training runs through
``jobs.JOBS`` inside the host's ``wrap_gradio_gpu_call`` (queue lock, ``shared.state``), so the host's
progress bar and live preview work as in its own Textual Inversion tab (javascript/dreamartist_train.js).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr

from modules import call_queue, sd_samplers, shared
from modules.ui_common import create_refresh_button
from modules.ui_components import FormRow, ToolButton

from ..config import (CLIP_MODES, LATENT_SAMPLING, PRECISIONS, RESIZE_MODES, ConfigError, PreviewConfig, TrainConfig,
                      option_help)
from ..data import BUILTIN_TEMPLATES, load_templates
from ..errors import InvalidInput
from ..names import NAME_RULES, negative_name, validate_concept_name
from . import host, jobs

PREFIX = "dreamartist"
DEFAULTS = TrainConfig(name="")
HOST_TEMPLATE_PREFIX = "webui/"  # dropdown entries for files in the host's textual_inversion_templates folder
EXISTING_CHOICES = {  # what to do when the pair already exists -> (continue_existing, overwrite)
    "Continue training it": (True, False),
    "Start over (replace it)": (False, True),
}
NO_CHECKPOINT = "None (start from the saved pair, or a new one)"
GRADIO_MAJOR = int(gr.__version__.split(".")[0])

# Mistakes a user can make (bad option, missing image, a job already running, unsupported model): shown in the tab
# as one sentence. Anything else is a bug and goes to the host's error handler (traceback in the log).
USER_ERRORS: tuple[type[BaseException], ...] = (*jobs.REQUEST_ERRORS, jobs.BusyError)
LOSS_LABELS = {"loss": "loss", "loss_denoise": "denoise", "loss_rec": "reconstruction", "loss_lpips": "LPIPS"}


def _elem_id(key: str) -> str:
    return f"{PREFIX}_{key.replace('.', '_')}"


# Form fields that show one part of a config value (the optimizer's betas are one tuple in TrainConfig).
SPLIT_DEFAULTS = {"adam_beta1": DEFAULTS.adam_betas[0], "adam_beta2": DEFAULTS.adam_betas[1]}


def _default(key: str) -> Any:
    if key in SPLIT_DEFAULTS:
        return SPLIT_DEFAULTS[key]
    owner, _, name = key.rpartition(".")
    return getattr(DEFAULTS.preview if owner == "preview" else DEFAULTS, name)


def field_info(key: str) -> str | None:
    """The tab's info line for a config field: its help text from the config (the same text as the CLI's)."""
    owner, _, name = key.rpartition(".")
    cls = PreviewConfig if owner == "preview" else TrainConfig
    try:
        text = option_help(cls, name)
    except KeyError:  # a "ui." control or a split field
        return None
    return text[:1].upper() + text[1:] if text else None


def _js_kwargs(function_name: str) -> dict[str, str]:
    """Gradio 3 calls the client-side hook ``_js``, Gradio 4 ``js``."""
    return {"_js" if GRADIO_MAJOR < 4 else "js": function_name}


# ---------------------------------------------------------------------------------------------------------------
# The form: components keyed by TrainConfig field ("preview.steps" for PreviewConfig) or by a "ui." control


def _info(key: str, info: str | None) -> str | None:
    return info if info is not None else field_info(key)


class TrainForm:
    def __init__(self) -> None:
        self.components: dict[str, gr.components.Component] = {}

    def add(self, key: str, component):
        self.components[key] = component
        return component

    @property
    def labels(self) -> dict[str, str]:
        return {key: component.label for key, component in self.components.items() if component.label}

    def number(self, key: str, label: str, *, integer: bool = False, minimum: float | None = None,
               info: str | None = None, maximum: float | None = None):
        return self.add(key, gr.Number(value=_default(key), label=label, precision=0 if integer else None,
                                       minimum=minimum, maximum=maximum, info=_info(key, info),
                                       elem_id=_elem_id(key)))

    def slider(self, key: str, label: str, minimum: float, maximum: float, step: float, *, info: str | None = None):
        return self.add(key, gr.Slider(minimum=minimum, maximum=maximum, step=step, value=_default(key), label=label,
                                       info=_info(key, info), elem_id=_elem_id(key)))

    def textbox(self, key: str, label: str, *, info: str | None = None, placeholder: str | None = None,
                multiline: bool = False):
        single_line = {} if multiline else {"max_lines": 1}
        return self.add(key, gr.Textbox(value=_default(key), label=label, info=_info(key, info),
                                        placeholder=placeholder,
                                        lines=1, elem_id=_elem_id(key), **single_line))

    def checkbox(self, key: str, label: str, *, value: bool | None = None, info: str | None = None):
        return self.add(key, gr.Checkbox(value=_default(key) if value is None else value, label=label,
                                         info=_info(key, info),
                                         elem_id=_elem_id(key)))

    def radio(self, key: str, label: str, choices: Sequence[str], *, info: str | None = None):
        return self.add(key, gr.Radio(choices=list(choices), value=_default(key), label=label, info=_info(key, info),
                                      elem_id=_elem_id(key)))

    def dropdown(self, key: str, label: str, choices: Sequence[str], *, value: str | None = None,
                 info: str | None = None, allow_custom_value: bool = False):
        return self.add(key, gr.Dropdown(choices=list(choices), value=_default(key) if value is None else value,
                                         label=label, info=_info(key, info), allow_custom_value=allow_custom_value,
                                         elem_id=_elem_id(key)))


# ---------------------------------------------------------------------------------------------------------------
# Values from the browser -> a TrainRequest


def _coerce(key: str, value: Any, label: str | None = None) -> Any:
    """Give a form value the type of its TrainConfig default (sliders and numbers may send 3.0 for an int)."""
    default, label = _default(key), label or key
    if value is None or (isinstance(value, str) and not value.strip() and not isinstance(default, str)):
        raise ConfigError(f"{label} is empty")
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        number = float(value)
        if number != int(number):
            raise ConfigError(f"{label} must be a whole number, got {value}")
        return int(number)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, str):
        return str(value).strip()
    return value


def uploaded_paths(files: Any) -> list[str]:
    """Gradio 3 gives temp-file wrappers (``.name`` is the path), Gradio 4 plain paths."""
    if not files:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [str(getattr(item, "name", item)) for item in files]


def template_choices() -> list[str]:
    """Our templates, then the host's usable ones (every line has [name]) as ``webui/<file>``."""
    choices = list(BUILTIN_TEMPLATES)
    folder = host.templates_dir()
    if folder.is_dir():
        for path in sorted(folder.rglob("*.txt")):
            try:
                load_templates(path)
            except InvalidInput:  # e.g. the host's hypernetwork.txt has no [name]: unusable for an embedding
                continue
            choices.append(HOST_TEMPLATE_PREFIX + path.relative_to(folder).as_posix())
    return choices


def template_option(choice: str) -> str:
    """Dropdown entry -> TrainConfig.template (a builtin name or a file path)."""
    choice = (choice or "").strip()
    if choice.startswith(HOST_TEMPLATE_PREFIX):
        return str(host.templates_dir() / choice[len(HOST_TEMPLATE_PREFIX):])
    return choice


def checkpoint_choices(name: str) -> list[str]:
    """Saved training checkpoints of ``name``, newest first (file names in the run's checkpoints folder)."""
    try:
        validate_concept_name(name or "")
    except InvalidInput:
        return [NO_CHECKPOINT]
    folder = host.host_layout(name).checkpoints_dir
    found = sorted(folder.glob(f"{name}-*.safetensors"), reverse=True) if folder.is_dir() else []
    return [NO_CHECKPOINT] + [path.name for path in found]


def request_from_form(values: dict[str, Any], txt2img_values: Sequence[Any] = (),
                      labels: dict[str, str] | None = None) -> jobs.TrainRequest:
    """Build the TrainRequest from the form; a bad value raises InvalidInput with a sentence for the user (the
    request is validated as a whole by jobs.JOBS.validate)."""
    options: dict[str, Any] = {}
    preview: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("ui."):
            continue
        coerced = _coerce(key, value, (labels or {}).get(key))
        if key.startswith("preview."):
            preview[key[len("preview."):]] = coerced
        else:
            options[key] = coerced
    options["preview"] = preview
    options["adam_betas"] = (options.pop("adam_beta1"), options.pop("adam_beta2"))

    name = options["name"]
    validate_concept_name(name)
    images = uploaded_paths(values["ui.uploads"])
    unfinished = [Path(path).name for path in images if Path(path).is_file() and Path(path).stat().st_size == 0]
    if unfinished:
        raise InvalidInput(f"{', '.join(unfinished)}: 0 bytes arrived (an upload that had not finished?); wait until "
                           "the upload box shows its size, then press Train again")
    folder = str(values["ui.folder"] or "").strip()
    if folder:
        images.append(folder)
    if not images:
        raise ConfigError("add at least one reference image (upload it, or give a folder with images)")
    options["images"] = images
    options["template"] = template_option(values["ui.template"])
    if not values["ui.reconstruction"]:
        options["reconstruction_weight"] = 0.0
        options["perceptual_weight"] = 0.0
    if not values["ui.adapters"]:
        options["unet_rank"] = 0
        options["text_rank"] = 0

    continue_existing, overwrite = EXISTING_CHOICES.get(values["ui.existing"], (True, False))
    checkpoint = values["ui.checkpoint"]
    resume = None
    if checkpoint and checkpoint != NO_CHECKPOINT:
        resume = str(host.host_layout(name).checkpoints_dir / Path(checkpoint).name)

    from_txt2img = None
    if values["ui.preview_from_txt2img"]:
        from_txt2img = dict(zip(jobs.PREVIEW_KEYS, txt2img_values))

    config = TrainConfig.from_dict(options)
    return jobs.TrainRequest(
        config=config, resume=resume, overwrite=overwrite, continue_existing=continue_existing,
        preview_from_txt2img=from_txt2img, preview_sampler=values["ui.preview_sampler"] or None,
    )


# ---------------------------------------------------------------------------------------------------------------
# What the tab shows


def error_html(message: str) -> str:
    return f"<div class='error'>{html.escape(message)}</div>"


def usage_html(name: str) -> str:
    return (f"Use <code>{html.escape(name)}</code> in a prompt and <code>{html.escape(negative_name(name))}</code> "
            f"in the negative prompt.")


def _format_losses(values: dict[str, Any]) -> str:
    return ", ".join(f"{label} {values[key]:.4g}" for key, label in LOSS_LABELS.items()
                     if isinstance(values.get(key), (int, float)))


_PREVIEW_STEP = re.compile(r"-(\d+)-\d+\.png$")


def _gallery_items(paths: Sequence[Any]) -> list[tuple[str, str]]:
    """Preview files with 'step N' captions (the trainer names them <name>-<step>-<i>.png)."""
    items = []
    for path in paths or []:
        path = str(path)
        match = _PREVIEW_STEP.search(path)
        items.append((path, f"step {int(match.group(1))}" if match else Path(path).name))
    return items


def summary_html(status: jobs.JobStatus, name: str) -> str:
    """One block for the ended job: state, step, last losses, speed, and how to use the result."""
    if status.state == "failed":
        return error_html(f"Training {name} failed at step {status.step}/{status.total}: {status.error}")
    title = {"finished": "Finished", "interrupted": "Interrupted", "diverged": "Stopped: the loss diverged"
             }.get(status.state, str(status.state).capitalize())
    head = f"<b>{html.escape(title)}</b> at step {status.step}/{status.total}"
    losses = _format_losses(status.values)
    if losses:
        head += f" &middot; {html.escape(losses)}"
    if status.steps_per_second:
        head += f" &middot; {status.steps_per_second:.2f} it/s"
    lines = [head]
    if status.files:
        lines.append(usage_html(name))
    if status.message:
        lines.append(f"<span class='{PREFIX}-detail'>{html.escape(str(status.message))}</span>")
    return f"<div class='{PREFIX}-summary'>" + "<br>".join(lines) + "</div>"


# ---------------------------------------------------------------------------------------------------------------
# Handlers


def make_train_handler(form: TrainForm, txt2img_count: int) -> Callable[..., tuple]:
    """fn(task_id, *form values, *txt2img values) -> (gallery, loss plot, files, checkpoints, status html)."""
    keys, labels = list(form.components), form.labels

    def train(task_id: str, *args):
        form_values = dict(zip(keys, args[:len(keys)]))
        txt2img_values = args[len(keys):len(keys) + txt2img_count]
        try:
            request = request_from_form(form_values, txt2img_values, labels)
            jobs.JOBS.ensure_idle()
            validated = jobs.JOBS.validate(request)  # nothing is written on a bad request
            # a failure while training ends in status.error
            status = jobs.JOBS.run_blocking(validated, take_queue_lock=False)
        except USER_ERRORS as error:
            return gr.update(), gr.update(), gr.update(), gr.update(), error_html(str(error))
        name = request.config.name
        files = "\n".join(str(path) for path in status.files or [])
        plot = str(status.loss_plot) if status.loss_plot else None
        checkpoints = gr.update(choices=checkpoint_choices(name))  # the run may have written new ones
        return _gallery_items(status.previews), plot, files, checkpoints, summary_html(status, name)

    return train


def create_pair_handler(name: str, init_text: str, positive_vectors, negative_vectors, overwrite: bool) -> str:
    try:
        validate_concept_name(name or "")
        jobs.JOBS.ensure_idle()  # a running job holds the queue lock: say so instead of waiting for it
        # the queue lock keeps generations out while the embedding lists are reloaded
        create = call_queue.wrap_queued_call(jobs.create_pair)
        written = create(name, init_text=init_text or DEFAULTS.init_text,
                         positive_vectors=_coerce("positive_vectors", positive_vectors),
                         negative_vectors=_coerce("negative_vectors", negative_vectors), overwrite=bool(overwrite))
    except USER_ERRORS as error:
        return error_html(str(error))
    listing = "".join(f"<li>{html.escape(str(path))}</li>" for path in written)
    return (f"<div class='{PREFIX}-summary'><b>Created {html.escape(name)} and {html.escape(negative_name(name))}"
            f"</b> (untrained, step 0). {usage_html(name)}<ul>{listing}</ul></div>")


def interrupt_handler() -> None:
    # Only stop the host's current job when it is ours: the button must not cancel a txt2img run elsewhere.
    if jobs.JOBS.cancel():
        shared.state.interrupt()


# ---------------------------------------------------------------------------------------------------------------
# Layout


def _pair_section(form: TrainForm):
    """Embedding lengths and initialisation; 'Create pair' writes the untrained pair (training also does)."""
    with gr.Accordion("Embedding pair", open=False, elem_id=_elem_id("pair_accordion")):
        with FormRow():
            form.textbox("init_text", "Initialization text (positive)")
            form.slider("positive_vectors", "Positive vectors", 1, 75, 1)
            form.slider("negative_vectors", "Negative vectors", 1, 75, 1)
        with FormRow():
            form.number("negative_noise", "Negative init noise", minimum=0)
            form.checkbox("use_negative", "Learn the negative embedding (off = plain textual inversion)")
        with FormRow(elem_classes=[f"{PREFIX}-create-row"]):
            overwrite = gr.Checkbox(value=False, label="Overwrite an existing pair",
                                    elem_id=_elem_id("create_overwrite"))
            create = gr.Button("Create pair", elem_id=_elem_id("create_pair"))
    return overwrite, create


def _learning_section(form: TrainForm) -> None:
    with gr.Accordion("Learning", open=False, elem_id=_elem_id("learning_accordion")):
        with FormRow():
            form.textbox("embedding_lr", "Embedding learning rate")
            form.number("negative_lr_scale", "Negative learning rate scale", minimum=0)
        form.textbox("guidance", "Guidance scale")
        with FormRow():
            form.number("batch_size", "Batch size (images per step)", integer=True, minimum=1)
            form.number("gradient_accumulation", "Gradient accumulation", integer=True, minimum=1)
            form.number("seed", "Training seed", integer=True)
        with FormRow():
            form.dropdown("clip_mode", "Gradient clipping", CLIP_MODES)
            form.number("clip_value", "Clip value", minimum=0)
            form.number("weight_decay", "Weight decay", minimum=0)
        with FormRow():
            form.number("adam_beta1", "Adam beta 1", minimum=0, maximum=1)
            form.number("adam_beta2", "Adam beta 2", minimum=0, maximum=1)
            form.number("max_bad_steps", "Stop after N non-finite steps", integer=True, minimum=1)
        with FormRow():
            form.dropdown("precision", "Precision", PRECISIONS)
            form.checkbox("gradient_checkpointing", "U-Net gradient checkpointing (less memory, a bit slower)")


def _reconstruction_section(form: TrainForm) -> None:
    with gr.Accordion("Reconstruction loss", open=False, elem_id=_elem_id("reconstruction_accordion")):
        with FormRow():  # a bare checkbox would share a flex line with the row below and push it sideways
            form.checkbox("ui.reconstruction", "Compare the decoded prediction with the image (paper's full method)",
                          value=DEFAULTS.uses_reconstruction)
        with FormRow():
            form.number("reconstruction_weight", "Reconstruction (L1) weight", minimum=0)
            form.number("perceptual_weight", "LPIPS weight", minimum=0)
            form.slider("reconstruction_scale", "Decoded crop", 0.125, 1.0, 0.125)


def _adapter_section(form: TrainForm) -> None:
    with gr.Accordion("Adapters (LoRA)", open=False, elem_id=_elem_id("adapters_accordion")):
        with FormRow():
            form.checkbox("ui.adapters", "Train a positive and a negative LoRA next to the embeddings",
                          value=DEFAULTS.uses_adapters)
        with FormRow():
            form.number("unet_rank", "U-Net rank", integer=True, minimum=0)
            form.number("text_rank", "Text encoder rank", integer=True, minimum=0)
            form.number("adapter_alpha", "Alpha", minimum=0)
        with FormRow():
            form.textbox("unet_lr", "U-Net learning rate")
            form.textbox("text_lr", "Text encoder learning rate")
            form.number("negative_adapter_lr_scale", "Negative adapter lr scale", minimum=0)


def _data_section(form: TrainForm) -> None:
    with gr.Accordion("Images and prompts", open=False, elem_id=_elem_id("data_accordion")):
        with FormRow():
            form.radio("resize", "Fit images to the training size", RESIZE_MODES)
            form.radio("latent_sampling", "Latent sampling", LATENT_SAMPLING)
        with FormRow():
            form.checkbox("flip", "Random horizontal flip")
            form.checkbox("use_alpha_weight", "Alpha channel as loss weight")
            form.checkbox("shuffle_tags", "Shuffle tags of [filewords]")
        form.slider("tag_dropout", "Tag dropout", 0.0, 1.0, 0.05)


def _preview_section(form: TrainForm) -> None:
    with gr.Accordion("Previews and saving", open=False, elem_id=_elem_id("preview_accordion")):
        with FormRow():
            form.number("save_every", "Save every N steps", integer=True, minimum=0)
            form.number("preview_every", "Preview every N steps", integer=True, minimum=0)
        with FormRow():
            form.checkbox("ui.preview_from_txt2img", "Take the preview prompt and settings from the txt2img tab",
                          value=False)
        with FormRow():
            form.textbox("preview.prompt", "Preview prompt", multiline=True)
            form.textbox("preview.negative_prompt", "Preview negative prompt", multiline=True)
        with FormRow():
            samplers = sd_samplers.visible_sampler_names()
            form.dropdown("ui.preview_sampler", "Preview sampler", samplers, value=samplers[0] if samplers else "")
            form.number("preview.steps", "Preview steps", integer=True, minimum=1)
            form.number("preview.guidance", "Preview CFG scale", minimum=1)
            form.number("preview.seed", "Preview seed", integer=True)
        with FormRow():
            form.number("preview.width", "Preview width", integer=True, minimum=0)
            form.number("preview.height", "Preview height", integer=True, minimum=0)
            form.number("preview.count", "Images per preview", integer=True, minimum=1)


def _resume_section(form: TrainForm, name):
    with gr.Accordion("Continue or resume", open=False, elem_id=_elem_id("resume_accordion")):
        form.add("ui.existing", gr.Radio(choices=list(EXISTING_CHOICES), value=next(iter(EXISTING_CHOICES)),
                                         label="If the pair already exists", elem_id=_elem_id("existing")))
        with FormRow():
            checkpoint = form.add("ui.checkpoint", gr.Dropdown(
                choices=[NO_CHECKPOINT], value=NO_CHECKPOINT, label="Resume from checkpoint",
                info="Exact continuation: optimizer state and random stream included", elem_id=_elem_id("checkpoint")))
            refresh = ToolButton(value="\U0001f504", elem_id=_elem_id("checkpoint_refresh"),
                                 tooltip="Checkpoints of this name: refresh")
    def listed(text):
        return gr.update(choices=checkpoint_choices(text))

    refresh.click(fn=listed, inputs=[name], outputs=[checkpoint])
    # Listed when the list is opened, not when the name field loses focus: an event finishing while an image
    # uploads makes gradio 3.41 drop the upload, and users type the name just before dropping the image.
    checkpoint.focus(fn=listed, inputs=[name], outputs=[checkpoint])
    return checkpoint


def create_train_tab(params) -> None:
    """on_ui_train_tabs callback: the DreamArtist tab (params.txt2img_preview_params = txt2img components)."""
    txt2img_params = list(getattr(params, "txt2img_preview_params", []) or [])
    form = TrainForm()
    with gr.Tab(label="DreamArtist", id=PREFIX, elem_id=f"{PREFIX}_tab"):
        gr.HTML(f"<p class='{PREFIX}-intro'>Learn a concept from one or a few images as a positive and a negative "
                "embedding (DreamArtist). Only the name and an image are needed; the rest has the paper's "
                "defaults.</p>")
        with FormRow():
            name = form.textbox("name", "Concept name", placeholder="e.g. mycat", info=NAME_RULES)
        with FormRow(elem_id=_elem_id("images_row")):
            form.add("ui.uploads", gr.File(label="Reference images", file_count="multiple", file_types=["image"],
                                           elem_id=_elem_id("uploads")))
            with gr.Column(elem_id=_elem_id("images_side")):
                form.add("ui.folder", gr.Textbox(label="Or a folder of images", placeholder="/path/to/images",
                                                 info="Captions are read from <image>.txt beside each image",
                                                 max_lines=1, elem_id=_elem_id("folder")))
                with FormRow():
                    template = form.add("ui.template", gr.Dropdown(
                        choices=template_choices(), value=DEFAULTS.template, label="Training prompts (template)",
                        allow_custom_value=True, elem_id=_elem_id("template")))
                    create_refresh_button(template, lambda: None, lambda: {"choices": template_choices()},
                                          _elem_id("template_refresh"))
        with FormRow():
            form.slider("width", "Training width", 0, 2048, 8)
            form.slider("height", "Training height", 0, 2048, 8)
            form.number("steps", "Training steps", integer=True, minimum=1)

        overwrite, create = _pair_section(form)
        _learning_section(form)
        _reconstruction_section(form)
        _adapter_section(form)
        _data_section(form)
        _preview_section(form)
        checkpoint = _resume_section(form, name)

        with gr.Row(elem_id=_elem_id("buttons")):
            train = gr.Button("Train", variant="primary", elem_id=_elem_id("train"))
            interrupt = gr.Button("Interrupt", elem_id=_elem_id("interrupt"))

        with gr.Column(elem_id=_elem_id("results")):
            # the host's progress bar is inserted above this line; the line shows shared.state.textinfo live
            gr.HTML(f"<div class='{PREFIX}-live'></div>", elem_id=_elem_id("progress"))
            status = gr.HTML("", elem_id=_elem_id("status"))
            with gr.Row():
                gallery = gr.Gallery(label="Previews", show_label=True, columns=3, height=280,
                                     elem_id=_elem_id("gallery"))
                loss_plot = gr.Image(label="Loss", type="filepath", interactive=False, height=280,
                                     elem_id=_elem_id("loss_plot"))
            files = gr.Textbox(label="Files written", lines=3, interactive=False, elem_id=_elem_id("files"))
        task_id = gr.Textbox(visible=False, elem_id=_elem_id("task_id"))

    train.click(
        fn=call_queue.wrap_gradio_gpu_call(make_train_handler(form, len(txt2img_params)),
                                           extra_outputs=[gr.update() for _ in range(4)]),
        **_js_kwargs("dreamartist_start_training"),
        inputs=[task_id, *form.components.values(), *txt2img_params],
        outputs=[gallery, loss_plot, files, checkpoint, status],  # status last: the host appends "Time taken"
    )
    interrupt.click(fn=interrupt_handler, inputs=[], outputs=[])
    create.click(
        fn=create_pair_handler,
        inputs=[name, form.components["init_text"], form.components["positive_vectors"],
                form.components["negative_vectors"], overwrite],
        outputs=[status],
    )
