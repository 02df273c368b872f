"""Tools nothing in serving imports: the benchmark and the performance model (``bench``), the
embedded default model's data, training and evaluation (``shapes``) and image quality metrics.

May import: every layer below (``hybridiff``, ``coordinator``, ``gpu_worker``, ``launch``).
"""
