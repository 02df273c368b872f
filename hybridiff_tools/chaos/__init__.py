"""``hybridiff chaos``: a load test on a local cluster under injected faults."""
