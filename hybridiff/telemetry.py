"""OpenTelemetry for both roles: one trace per request across client, coordinator and workers.

Configured by the standard variables: spans are exported over OTLP/gRPC when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, ``OTEL_SERVICE_NAME``
names the service, ``OTEL_SDK_DISABLED=true`` turns it off. The resource carries
``service.name``, ``service.version`` (the package's) and ``service.instance.id`` (host:pid,
unless ``OTEL_RESOURCE_ATTRIBUTES`` names one), plus what ``OTEL_RESOURCE_ATTRIBUTES`` adds.
Context crosses gRPC in metadata (the grpc instrumentation's interceptors) and crosses the
worker control stream and the ZeroMQ header as a W3C ``traceparent`` dict (``inject`` / ``extract``).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from contextlib import contextmanager

import grpc
from opentelemetry import propagate, trace

from hybridiff import __version__

log = logging.getLogger(__name__)

_provider = None


def setup_tracing(default_service_name: str):
    """Install the global tracer provider once per process; returns it."""
    global _provider
    if _provider is not None:
        return _provider
    # deferred: the OpenTelemetry SDK is a server dependency; the light client has only the API.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    name = os.environ.get("OTEL_SERVICE_NAME", default_service_name)
    provider = TracerProvider(resource=Resource.create(resource_attributes(name)))
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint and not disabled:
        # deferred: the OTLP exporter is a server dependency (see above).
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500))
        log.info("exporting traces over OTLP/gRPC to %s as %s", endpoint, name)
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    _provider = provider
    return provider


def resource_attributes(service_name: str) -> dict[str, str]:
    """The resource's own attributes; ``OTEL_RESOURCE_ATTRIBUTES`` may set the instance id instead."""
    attributes = {"service.name": service_name, "service.version": __version__}
    named = {
        item.split("=", 1)[0].strip() for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    }
    if "service.instance.id" not in named:
        attributes["service.instance.id"] = f"{socket.gethostname()}:{os.getpid()}"
    return attributes


def setup_tracing_if_installed(default_service_name: str):
    """``setup_tracing`` where the OpenTelemetry SDK is installed (the servers, the full CLI); the
    light client's install has only the API, and then traces nothing. Returns the provider or None."""
    try:
        return setup_tracing(default_service_name)
    except ImportError:
        return None


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject() -> dict[str, str]:
    """The current span's context as a carrier dict (traceparent/tracestate)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def span_from(carrier: dict[str, str] | None, tracer_: trace.Tracer, name: str, **attributes):
    """A span whose parent is the context in ``carrier`` (a remote parent)."""
    ctx = propagate.extract(carrier or {})
    with tracer_.start_as_current_span(name, context=ctx, attributes=attributes or None) as span:
        yield span


def server_interceptors() -> list:
    from opentelemetry.instrumentation.grpc import server_interceptor  # deferred: a server dependency

    return [server_interceptor()]


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    # The instrumentation's interceptor speaks its own channel-wrapping API (grpcext), not grpc's.
    # deferred: the gRPC instrumentation is a server dependency.
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor())
