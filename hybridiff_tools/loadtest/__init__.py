"""``hybridiff loadtest``: a bounded load generator over the real gRPC API, and the latency
versus offered-load sweep of the allocation policies (``sweep``).

May import: every layer below ``tools`` (``hybridiff``, the roles, ``launch``).
"""
