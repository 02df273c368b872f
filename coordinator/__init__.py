"""The coordinator process: the public ``hybridiff.v1`` API, the admission queue and pair
allocator (``pool``), the schedule and discrepancy monitor (``schedule``), the step protocol's
driver (``driver``), remote worker sessions, metrics and worker discovery.

May import: ``hybridiff`` only — never ``gpu_worker``, ``launch`` or ``tools``.
"""
