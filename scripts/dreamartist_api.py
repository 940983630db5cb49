"""Wires the DreamArtist HTTP API (/dreamartist/v1/...) into the host; the routes live in dreamartist_ext.webui.api."""

from modules import script_callbacks

from dreamartist_ext.webui import api

script_callbacks.on_app_started(api.register)
