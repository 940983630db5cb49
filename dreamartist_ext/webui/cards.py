"""The host's extra-networks cards for learned concepts, made to do what typing the word does.

Left alone, the host shows a DreamArtist pair wrongly three ways: the Textual Inversion card of `name` adds `name`
to the prompt but not `name-neg` to the negative prompt; `name-neg` gets a card of its own that lands in whichever
prompt was last focused (the positive one by default); and each adapter gets a Lora card whose `<lora:...>` applies
that branch's adapter to BOTH CFG branches, the misuse DreamArtist exists to avoid. Here the concept's card adds
`name` to the prompt and `name-neg` to the negative prompt (the adapters then follow per branch from the always-on
DreamArtist script, exactly as when the word is typed), and the partner and the adapters have no card.

Two methods of the host's ExtraNetworksPage base class are wrapped (installed when the prompt script loads, put
back when the host unloads scripts): listing, to leave out the partner and the adapters, and card rendering, to give
the concept's card its negative text.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from ..names import negative_name
from .learned import LEARNED

TEXTUAL_INVERSION_PAGE = "textual inversion"  # ExtraNetworksPage.name: the page title, lower-cased
LORA_PAGE = "lora"

_originals: dict[str, Any] = {}
_listing = threading.local()  # the rules of the page being rendered, read once for all its cards


def _real(path: Any) -> str:
    return os.path.realpath(str(path))


@dataclass(frozen=True)
class CardRules:
    """What the learned concepts change on the cards, read once from the host's folders."""

    partners: dict[str, str]  # concept name -> its negative partner's name
    partner_names: frozenset[str]
    adapter_files: frozenset[str]

    @classmethod
    def current(cls) -> "CardRules":
        learned = LEARNED.current().values()
        partners = {info.name: negative_name(info.name) for info in learned if info.negative_embedding}
        return cls(partners=partners, partner_names=frozenset(partners.values()),
                   adapter_files=frozenset(_real(path) for info in learned
                                           for path in (info.lora, info.negative_lora) if path))

    def hides(self, page_name: str, item: dict[str, Any]) -> bool:
        """A negative partner, or an adapter file: offered through the concept's own card instead."""
        if page_name == TEXTUAL_INVERSION_PAGE:
            return item.get("name") in self.partner_names
        if page_name == LORA_PAGE and item.get("filename"):
            return _real(item["filename"]) in self.adapter_files
        return False

    def card(self, page_name: str, item: dict[str, Any]) -> dict[str, Any]:
        """The concept's Textual Inversion card with `name-neg` as its negative-prompt text (the host's cardClicked
        then adds the name to the prompt and the partner to the negative prompt; a second click removes both)."""
        partner = self.partners.get(item.get("name")) if page_name == TEXTUAL_INVERSION_PAGE else None
        if partner is None:
            return item
        from modules.ui_extra_networks import quote_js

        return {**item, "negative_prompt": quote_js(partner)}


def install() -> None:
    from modules import ui_extra_networks

    page_class = ui_extra_networks.ExtraNetworksPage
    if _originals:
        return
    _originals.update(create_html=page_class.create_html, create_item_html=page_class.create_item_html)
    create_html, create_item_html = _originals["create_html"], _originals["create_item_html"]

    def listing_without_ours(self, tabname, *args, **kwargs):
        rules = CardRules.current()
        own = vars(self).get("list_items")  # another extension's per-page override, kept as it was
        listed = self.list_items

        def list_items():
            return (item for item in listed() if not rules.hides(self.name, item))

        self.list_items, _listing.rules = list_items, rules
        try:
            return create_html(self, tabname, *args, **kwargs)
        finally:
            _listing.rules = None
            if own is None:
                del self.list_items
            else:
                self.list_items = own

    def card_with_partner(self, tabname, item, *args, **kwargs):
        rules = getattr(_listing, "rules", None) or CardRules.current()  # a single card is re-rendered alone
        return create_item_html(self, tabname, rules.card(self.name, item), *args, **kwargs)

    page_class.create_html = listing_without_ours
    page_class.create_item_html = card_with_partner


def uninstall() -> None:
    if not _originals:
        return
    from modules import ui_extra_networks

    for attribute, original in _originals.items():
        setattr(ui_extra_networks.ExtraNetworksPage, attribute, original)
    _originals.clear()
