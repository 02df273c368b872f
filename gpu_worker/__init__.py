"""The GPU worker role: model adapters (diffusers wrappers), the two-stage split, the per-step
engine that runs a branch, a stage or the whole CFG batch, and the data plane to its peer."""
