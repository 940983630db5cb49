"""DreamArtist: teach Stable Diffusion a concept from one image.

Learns a pair of textual-inversion embeddings (``name`` for the positive prompt, ``name-neg`` for the negative
prompt) and, optionally, positive/negative LoRA adapters that act on the positive and negative branch of
classifier-free guidance. The engine in this package is host-agnostic; ``diffusers_binding`` runs it on diffusers
models (CLI, tests) and ``webui.binding`` on the model AUTOMATIC1111 has loaded (the rest of the host glue is
in ``webui``, one module per concern).
"""

__version__ = "0.1.0"
