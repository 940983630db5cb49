"""Selectable "DreamArtist batch" script: every learned concept x prompt (x guidance) in one run, each with
``name`` / ``name-neg`` and its adapters routed per CFG branch (dreamartist_ext.webui.batch.run_batch)."""

import gradio as gr
from fastapi import HTTPException

from modules import scripts

from dreamartist_ext.webui import batch


class DreamArtistBatch(scripts.Script):
    def title(self):
        return "DreamArtist batch"

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        concepts = gr.Textbox(label="Concepts (comma-separated; empty = every learned concept)", lines=1,
                              info="Adapters use the default weight of Settings > DreamArtist",
                              elem_id=f"{tab}_dreamartist_batch_concepts")
        prompts = gr.Textbox(label="Prompts, one per line; [name] stands for the concept", lines=3,
                             value=batch.BatchPlan.PLACEHOLDER, elem_id=f"{tab}_dreamartist_batch_prompts")
        guidance = gr.Textbox(label="Guidance (CFG) values, comma-separated; empty = the CFG scale above", lines=1,
                              elem_id=f"{tab}_dreamartist_batch_guidance")
        return [concepts, prompts, guidance]

    def run(self, p, concepts, prompts, guidance):
        try:
            return batch.run_batch(p, concepts, prompts, guidance)
        except batch.BatchArgumentError as error:
            if p.is_api:  # a 422 with the sentence, not a server error with a traceback
                raise HTTPException(status_code=422, detail=f"DreamArtist batch: {error}") from None
            raise
