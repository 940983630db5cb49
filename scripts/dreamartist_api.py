"""Wires the DreamArtist HTTP API (/dreamartist/v1/...) into the host; the routes live in dreamartist_ext.webui_api."""

from modules import script_callbacks

from dreamartist_ext import webui_api

script_callbacks.on_app_started(webui_api.register)
