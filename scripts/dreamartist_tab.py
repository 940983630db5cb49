"""Adds the DreamArtist sub-tab to the WebUI's Train tab (the UI itself lives in dreamartist_ext.webui_ui) and its
training setting (dreamartist_ext.webui_binding)."""

from modules import script_callbacks

from dreamartist_ext import webui_binding, webui_ui

script_callbacks.on_ui_train_tabs(webui_ui.create_train_tab)
script_callbacks.on_ui_settings(webui_binding.add_settings)
