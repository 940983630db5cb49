"""Learned words at generation time in AUTOMATIC1111: each CFG branch gets its own adapter.

The host puts the positive and the negative side of classifier-free guidance into the same U-Net calls, in a
layout that depends on its settings (one call for all rows, chunks, separate calls for prompts of different
token lengths, no uncond rows on skipped steps). ``on_cfg_denoiser`` tells us, before each denoiser call, how
its rows are laid out: the cond rows (one per image and AND sub-prompt) first, then the uncond rows. Every
U-Net call that follows consumes those rows in order, so a cursor in a forward pre-hook on the U-Net knows the
branch of each row of each call. The text encoder is told which prompt it encodes by the host itself: the
negative prompts arrive as an ``SdConditioning`` marked ``is_negative_prompt``.

:func:`attach_adapters` puts the composed adapters of learned concepts on the host's model; :func:`routed_generation`
routes attached adapters during one generation. Users: training previews (jobs), the batch script (batch) and the
always-on prompt script (prompts).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping, Sequence

from .. import concepts as concept_files
from ..adapters import BranchAdapters
from ..model import NEG, POS, conditioning_rows
from . import host
from .binding import WebuiBinding
from .learned import LEARNED

log = logging.getLogger(__name__)


class BranchRouter:
    """Tells the adapters the CFG branch of every row of every U-Net and text-encoder call."""

    def __init__(self, adapters: BranchAdapters) -> None:
        self.adapters = adapters
        self.roles: list[str] = []  # this denoiser call's x_in rows: cond rows, then uncond rows
        self.cursor = 0
        self.unrouted_rows = 0

    def on_cfg_denoiser(self, params) -> None:
        rows = int(params.x.shape[0])
        cond, uncond = conditioning_rows(params.text_cond), conditioning_rows(params.text_uncond)
        # Anything but "cond rows then uncond rows" (an edit model's extra rows) is a layout we cannot read.
        self.roles = [POS] * cond + [NEG] * uncond if cond + uncond == rows else []
        self.cursor = 0

    def before_unet(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        count = int(x.shape[0])
        rows = self.roles[self.cursor:self.cursor + count]
        self.cursor += count
        if len(rows) != count:
            if not self.unrouted_rows:
                log.warning("DreamArtist: a U-Net call of %d rows fell outside the CFG layout; it runs with the "
                            "base weights (no adapter)", count)
            self.unrouted_rows += count
            rows = None
        self.adapters.set_rows("unet", rows)

    def after_unet(self, module, args, kwargs, output):
        self.adapters.set_rows("unet", None)

    def before_text(self, module, args):
        texts = args[0] if args else None
        if isinstance(texts, dict):  # SDXL's conditioner takes a batch dict; the prompts are its "txt"
            texts = texts.get("txt")
        if texts is None:
            return
        branch = NEG if getattr(texts, "is_negative_prompt", False) else POS
        self.adapters.set_rows("te", [branch] * len(texts))

    def after_text(self, module, args, output):
        self.adapters.set_rows("te", None)


_ROUTING: list[BranchRouter | None] = []  # the generation being routed (None: routed without adapters)


def routing_active() -> bool:
    return bool(_ROUTING)


def active_adapters() -> BranchAdapters | None:
    """The adapters routed right now (for diagnostics and the integration tests' probe)."""
    return _ROUTING[-1].adapters if _ROUTING and _ROUTING[-1] is not None else None


@contextlib.contextmanager
def routed_generation(adapters: BranchAdapters | None, p) -> Iterator[BranchRouter | None]:
    """While processing ``p``: cond rows of every U-Net call use the positive adapter, uncond rows the negative
    one; the negative prompt is encoded with the negative text-encoder adapter, the positive with the positive.

    The adapters must be attached to the host's current model; they stay attached afterwards (the caller owns
    them). The host's cond cache is invalidated before and after, so no conds of another routing are reused.
    """
    from modules import script_callbacks, shared

    if _ROUTING:
        raise RuntimeError("DreamArtist adapters are already being routed for another generation")
    with contextlib.ExitStack() as stack:
        host.invalidate_cond_cache(p)
        stack.callback(host.invalidate_cond_cache, p)
        if adapters is None or not adapters.attached:
            _ROUTING.append(None)
            stack.callback(_ROUTING.pop)
            yield None
            return
        router = BranchRouter(adapters)
        _ROUTING.append(router)
        stack.callback(_ROUTING.pop)
        stack.callback(adapters.set_rows, "unet", None)
        stack.callback(adapters.set_rows, "te", None)
        script_callbacks.on_cfg_denoiser(router.on_cfg_denoiser, name="dreamartist_branch_routing")
        stack.callback(script_callbacks.remove_callbacks_for_function, router.on_cfg_denoiser)
        if "unet" in adapters.parts:
            unet = adapters.sites["unet"].root
            stack.callback(unet.register_forward_pre_hook(router.before_unet, with_kwargs=True).remove)
            stack.callback(unet.register_forward_hook(router.after_unet, with_kwargs=True).remove)
        if "te" in adapters.parts:
            text_encoder = shared.sd_model.cond_stage_model  # the host's wrapper: it sees SdConditioning
            stack.callback(text_encoder.register_forward_pre_hook(router.before_text).remove)
            stack.callback(text_encoder.register_forward_hook(router.after_text).remove)
        yield router


def attach_adapters(concepts: Sequence[concept_files.ConceptInfo], weights: Mapping[str, float]) -> BranchAdapters:
    """The composed adapters of ``concepts`` attached to the host's model (the caller detaches them)."""
    from modules import shared

    loaded = [LEARNED.adapters_of(info) for info in concepts]
    layers = concept_files.composed_adapters(loaded, weights)
    binding = WebuiBinding(shared.sd_model)
    names = ", ".join(info.name for info in concepts)
    return BranchAdapters.from_layers(binding.adapter_sites(), layers, source=f"adapters of {names}")
