"""DreamArtist inside AUTOMATIC1111: the host glue, one module per concern (scripts/ only wires these to the host's
callbacks, as the host's built-in Lora extension does).

    host      every touch of the host's state: folders, embedding database, Lora networks, attention switch,
              Settings > DreamArtist (and the reads of it), sampler names, cond-cache invalidation
    binding   the engine's DiffusionBinding on the model the host has loaded (shared.sd_model)
    jobs      training as a host job: request -> validated job -> status; pairs and the concept list
    uploads   images sent as base64: decoded and checked once, then staged for the run
    api       the HTTP API /dreamartist/v1/... (models generated from TrainConfig and JobStatus)
    ui        the DreamArtist sub-tab of the Train tab
    learned   the learned concepts in the host's folders, cached until a file changes
    routing   per-branch routing of adapters during a generation (BranchRouter, routed_generation, attach)
    prompts   the always-on prompt script's work: learned words -> adapters per branch, auto name-neg,
              infotext paste, the prompt-words route for the JavaScript
    batch     the "DreamArtist batch" script's plan and run
    cards     the extra-networks cards of learned concepts

Nothing here imports the host's ``modules`` at import time except ``ui`` (built inside the host only).
"""
