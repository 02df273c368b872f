"""The GPU end-to-end check (``hybridiff gpu-check``, ``scripts/gpu-check.sh``): every mode
through a local cluster on the GPU(s), eager and compiled, checked against SINGLE.

May import: every layer below ``tools`` (``hybridiff``, the roles, ``launch``) and ``tools``.
"""
