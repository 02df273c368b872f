"""The coordinator's options (``hybridiff coordinator``), each declared once: its flag, default,
help and check. The command line's flags are generated from ``CoordinatorConfig`` and parse
into it, ``coordinator.server.serve_configured`` serves it, and a launcher turns one into the
child's argv with ``hybridiff.options.to_argv``. Light to import: the command line builds its
parser from here.
"""

from __future__ import annotations

import dataclasses

from hybridiff import security
from hybridiff.options import ON_OFF, Options, non_negative_int, option, positive_seconds

POLICIES = ("latency", "throughput", "adaptive")  # coordinator.allocation.Policy's values
POLICY_HELP = (
    "how AUTO requests get workers: latency (a pair whenever two are free), throughput (one worker "
    "each), adaptive (decided at admission and at every step boundary: shrink when a request waits, grow "
    "when a worker idles and the steps left pay for it)"
)
QUEUE_SIZE_HELP = "requests that may wait for workers"


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig(Options):
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(50051, "public API port (0: any free port)", parse=int)
    metrics_port: int = option(9090, "Prometheus /metrics port (0: any free port)", parse=int)
    discovery: str = option(
        "static",
        "how workers are found: a fixed list, or the Kubernetes API",
        choices=("static", "kubernetes"),
    )
    workers: str = option("", "static discovery: HOST:PORT,... of the workers' control APIs")
    namespace: str = option("default", "kubernetes discovery: namespace of the worker pods")
    selector: str = option("app.kubernetes.io/component=worker", "kubernetes discovery: label selector")
    worker_port: int = option(50061, "kubernetes discovery: workers' control port", parse=int)
    health_port: int | None = option(
        None,
        "plaintext gRPC health Check only, on threads of its own, for kubelet probes (0: any port)",
        parse=int,
    )
    http_port: int = option(
        0, "the OpenAI-compatible HTTP API and the playground page on this port (0: off)", parse=int
    )
    queue_size: int = option(16, QUEUE_SIZE_HELP, parse=non_negative_int)
    policy: str = option("adaptive", POLICY_HELP, choices=POLICIES)
    step_timeout: float = option(
        600.0,
        "the most seconds to wait for a worker's answer (a step waits a few measured step costs)",
        parse=positive_seconds,
    )
    speculative_steps: bool = option(
        True,
        "HYBRID: issue the step whose phase the monitor has not decided yet speculatively, so no "
        "worker waits for the decision (off: every step after L waits for the round trip)",
        **ON_OFF,
    )
    ready_file: str | None = option(None, "write the bound ports here as JSON once serving")
    l_slope: int | None = option(None, "override every model's default L_slope", parse=int)
    eps_slope: float | None = option(None, "override every model's default eps_slope", parse=float)
    k: int | None = option(None, "override every model's default k", parse=int)
    tau_cap: int | None = option(None, "override every model's default tau_cap", parse=int)
    refresh_every: int | None = option(None, "override every model's default refresh_every", parse=int)
    tls_cert: str | None = option(None, "public API: TLS certificate (PEM)")
    tls_key: str | None = option(None, "public API: TLS private key (PEM)")
    tls_client_ca: str | None = option(None, "public API: require client certificates from this CA")
    auth_token_file: str | None = option(
        None, "public API: require this bearer token (default: $HYBRIDIFF_AUTH_TOKEN if set)"
    )
    worker_tls_ca: str | None = option(None, "control channels: CA of the workers' certificates")
    worker_tls_cert: str | None = option(None, "control channels: the coordinator's client certificate")
    worker_tls_key: str | None = option(None, "control channels: the coordinator's client key")
    worker_tls_name: str = option(
        security.WORKER_NAME,
        "control channels: the name (DNS subjectAltName) the workers' certificates must carry",
    )
    admin_token_file: str | None = option(
        None,
        "public API: the only bearer token ClusterStatus takes (default: $HYBRIDIFF_ADMIN_TOKEN if "
        "set); with an ordinary token and no admin token, ClusterStatus is refused",
    )

    @property
    def tls(self) -> tuple[str | None, str | None, str | None]:
        """(cert, key, client CA) of the public API, as ``hybridiff.serving`` takes them."""
        return (self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def hybrid_overrides(self) -> dict[str, int | float | None]:
        """The operator's overrides of every model's hybrid defaults (None: the model's)."""
        return {
            "l_slope": self.l_slope,
            "eps_slope": self.eps_slope,
            "k": self.k,
            "tau_cap": self.tau_cap,
            "refresh_every": self.refresh_every,
        }
