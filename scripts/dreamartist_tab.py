"""Adds the DreamArtist sub-tab to the WebUI's Train tab (the UI itself lives in dreamartist_ext.webui.ui) and the
Settings > DreamArtist section (dreamartist_ext.webui.host)."""

from modules import script_callbacks

from dreamartist_ext.webui import host, ui

script_callbacks.on_ui_train_tabs(ui.create_train_tab)
script_callbacks.on_ui_settings(host.add_settings)
