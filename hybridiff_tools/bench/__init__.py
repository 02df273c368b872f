"""Benchmark and profiling tools (docs/design.md section 4).

``perfmodel`` re-exports the pure schedule latency model (``coordinator.latency_model``: the
"ideal speedup" and the two-GPU prediction); ``gpu_profile`` times full-size SDXL / SD3
denoisers with random weights and feeds the times into it. ``configs/`` keeps the full-size
architecture configs (no download).

May import: every layer below ``tools`` (``hybridiff``, the roles, ``launch``).
"""
