"""Hybridiff's bottom layer: what every process and every client shares.

Lives here: the wire format (``wire``), the step protocol's vocabulary (``protocol``), request
validation (``request``), typed errors and their gRPC status details (``errors``), telemetry,
security, the servers' shared helpers (``serving``), the light client (``client``) and the
generated API code (``hybridiff.v1`` public, ``hybridiff.internal.v1`` internal; generated from
proto/ at build by ``codegen``). May import: nothing of this project above it — neither role
(coordinator/, gpu_worker/), nor hybridiff_launch/ or hybridiff_tools/ (tests/test_layers.py holds this).
"""

__version__ = "0.1.0"
