"""Hybridiff: hybrid data-pipeline parallel CFG diffusion serving (shared package).

What both roles use lives here: the wire format, request model and validation, errors,
telemetry and the generated API code (hybridiff.v1, hybridiff.internal.v1: generated from proto/ at build).
"""

__version__ = "0.1.0"
