"""The embedded default model's data and training (``grammar``, ``render``, ``train``), its
prompt-adherence checker (``adherence``), evaluation (``evaluate``) and commands (``cli``).

May import: every layer below ``tools`` (``hybridiff``, the roles, ``launch``).
"""
