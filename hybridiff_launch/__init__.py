"""The launch layer: what composes the two roles — the ``hybridiff`` CLI, the local cluster
(coordinator and workers as local processes), the in-process pair (``hybridiff run``), and the
model the launchers fall back to (the embedded default, or a tiny random one).

May import: ``hybridiff``, ``coordinator``, ``gpu_worker`` — never ``tools`` (the CLI finds the
tool commands through the ``hybridiff.tools`` entry points).
"""
