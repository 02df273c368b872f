"""Model adapters: what the worker needs of a diffusers model (prompt encoding, latents, one
denoiser forward, the two-stage split, the scheduler step, the VAE decode), done by the
pipeline's own methods — never a copy of its loop. ``base`` is the interface; ``sdxl`` and
``sd3`` wrap the two pipelines; ``unet_split`` and ``dit_split`` cut their denoisers in two.

May import: ``hybridiff`` and diffusers — never ``coordinator``, ``launch`` or ``tools``.
"""
