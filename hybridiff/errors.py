"""Typed errors of the service, each mapped to one gRPC status code at the edge (DESIGN section 3)."""
from __future__ import annotations

import grpc


class HybridiffError(Exception):
    """Base of every error a user may see; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(HybridiffError):
    """A request field is out of range; ``field`` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(HybridiffError):
    code = grpc.StatusCode.NOT_FOUND


class ModelLoadError(HybridiffError):
    """A model directory is missing or is not a diffusers model of a supported architecture."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(HybridiffError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(HybridiffError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(HybridiffError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(HybridiffError):
    code = grpc.StatusCode.CANCELLED


class PeerTimeout(HybridiffError):
    """A worker waited longer than its per-message deadline for its peer."""

    code = grpc.StatusCode.UNAVAILABLE


class WorkerFailed(HybridiffError):
    """A worker raised while executing a step; the message says which and why."""

    code = grpc.StatusCode.INTERNAL
