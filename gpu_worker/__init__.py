"""The GPU worker process: model adapters (diffusers wrappers), the two-stage split and its cut
chooser, the per-step engine that runs a branch, a stage or the whole CFG batch, the ZeroMQ data
plane to its peer, and the control API the coordinator drives.

May import: ``hybridiff`` only — never ``coordinator``, ``launch`` or ``tools``.
"""
