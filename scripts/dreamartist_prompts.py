"""Always-on "DreamArtist" section of txt2img/img2img: a learned word typed into the prompt gets its positive
adapter on the positive branch and its negative adapter on the negative branch (dreamartist_ext.webui.prompts
does the work; dreamartist_ext.webui.cards fixes the extra-networks cards; this file only wires the host's
callbacks)."""

import logging

import gradio as gr

from modules import script_callbacks, scripts

from dreamartist_ext.webui import cards, host, prompts

log = logging.getLogger(__name__)


class DreamArtistPrompts(scripts.Script):
    def title(self):
        return "DreamArtist"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion("DreamArtist", open=False, elem_id=f"{tab}_dreamartist"):
            enabled = gr.Checkbox(value=True, label="Apply the adapters of learned words in the prompt",
                                  elem_id=f"{tab}_dreamartist_enabled")
            weight = gr.Slider(minimum=0.0, maximum=host.MAX_WEIGHT, step=0.05,
                               value=host.default_weight(), label="Adapter weight",
                               elem_id=f"{tab}_dreamartist_weight")
            auto_negative = gr.Checkbox(value=host.default_auto_negative(),
                                        label="Add name-neg to the negative prompt when missing",
                                        elem_id=f"{tab}_dreamartist_auto_negative")
        self.infotext_fields = [
            (enabled, prompts.pasted_enabled),
            (weight, prompts.pasted_weight),
            (auto_negative, prompts.pasted_auto_negative),
        ]
        return [enabled, weight, auto_negative]

    def process(self, p, enabled, weight, auto_negative):
        try:
            options = prompts.PromptOptions.from_args(enabled, weight, auto_negative)
        except ValueError as error:
            log.warning("%s; DreamArtist does nothing in this generation", error)
            return
        prompts.begin_generation(p, options)

    def postprocess(self, p, processed, *args):
        prompts.end_generation(p)


script_callbacks.on_app_started(prompts.add_routes)
script_callbacks.on_script_unloaded(prompts.unload)
# the concept's extra-networks card brings name + name-neg; the partner and the adapters get no card of their own
cards.install()
script_callbacks.on_script_unloaded(cards.uninstall)
