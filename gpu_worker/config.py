"""The worker's options (``hybridiff worker``), each declared once: its flag, default, help and
check. The command line's flags are generated from ``WorkerConfig`` and parse into it, the
process takes it (``gpu_worker.process``), and a launcher turns one into the child's argv with
``hybridiff.options.to_argv``. Light to import: the command line builds its parser from here.
"""

from __future__ import annotations

import dataclasses

from hybridiff import security
from hybridiff.options import ON_OFF, Options, cidr_list, non_negative_int, option, positive_seconds

# A session opens with its Begin, sent with the stream: one that has not sent it by then holds
# the worker for nothing (SESSION_IDLE, as an idle session).
BEGIN_SECONDS = 5.0
SESSION_IDLE_SECONDS = 60.0
# Above the longest healthy command with the engine's default peer timeout (120 s): its peer
# waits (the nested pipeline's core waits for two messages; a speculative step for its peer's
# prediction, its resolution, as a FULL_CFG fill for the peer's half of the stale activations,
# and with staged transfers for its own sends at its end: four) and one send.
WATCHDOG_SECONDS = 600.0
COMPILE_CHOICES = ("auto", "none", "default", "reduce-overhead", "max-autotune")
# The flags of the weights, shared with ``run``, ``local`` and the tools that load a model.
MODEL_FLAGS = ("model", "variant", "hf_token_file")
LOAD_FLAGS = ("config", "text_encoder_3")


@dataclasses.dataclass(frozen=True)
class WorkerConfig(Options):
    model: str | None = option(
        None,
        "the weights: a diffusers folder, or a Hugging Face Hub id ORG/NAME[@REV] fetched into the "
        "Hub cache (HF_HOME; only the files loaded; offline once cached) (default: the embedded model)",
        names=("--model", "--model-dir"),
    )
    variant: str | None = option(
        None, "the weights' variant as diffusers names it (fp16: the *.fp16.safetensors files)"
    )
    hf_token_file: str | None = option(
        None, "a Hub token for gated or private repositories (default: $HF_TOKEN or a stored login)"
    )
    config: str | None = option(
        None,
        "with --model FILE.safetensors (a single-file checkpoint): its pipeline's diffusers folder "
        "or Hub id ORG/NAME[@REV] (configs, tokenizers, scheduler, and the components the file lacks)",
    )
    text_encoder_3: bool = option(
        False,
        "SD3: load the T5 text encoder (on: the reference prompt path, more memory; off: "
        "zeros stand for its embeddings, as diffusers does without it) (default: off)",
        **ON_OFF,
    )
    served_model_name: str | None = option(
        None,
        "the name clients use (default: the Hub id or the folder's name)",
        names=("--served-model-name", "--model-name"),
    )
    host: str = option("0.0.0.0", "address to listen on")
    advertise_host: str | None = option(None, "host peers reach this worker at (default: hostname)")
    port: int = option(50061, "control API port (0: any free port)", parse=int)
    data_port: int = option(50062, "data-plane port (0: any free port)", parse=int)
    advertise_data_address: str | None = option(
        None, "tcp://HOST:PORT peers push data-plane frames to (default: the advertised host, data port)"
    )
    metrics_port: int = option(9091, "Prometheus /metrics port (0: any free port)", parse=int)
    worker_id: str | None = option(None, "name in logs and stats (default: HOST:PORT)")
    device: str | None = option(None, "cpu | cuda[:N] (default: cuda when present)")
    dtype: str | None = option(None, "float32 | float16 | bfloat16 (default: fp16 on GPU, fp32 on CPU)")
    cpus: str | None = option(None, "pin to these cores (e.g. 0 or 0-3), one torch thread per core")
    ready_file: str | None = option(None, "write the bound addresses here as JSON once serving")
    tls_cert: str | None = option(None, "control API: TLS certificate (PEM)")
    tls_key: str | None = option(None, "control API: TLS private key (PEM)")
    tls_client_ca: str | None = option(
        None, "control API: accept only clients (the coordinator) with a certificate from this CA"
    )
    tls_client_name: str = option(
        security.COORDINATOR_NAME,
        "control API with --tls-client-ca: the name (DNS or URI subjectAltName) the client's "
        "certificate must carry",
    )
    health_port: int | None = option(
        None,
        "plaintext gRPC health only, for kubelet probes when the control port has TLS (0: any port)",
        parse=int,
    )
    curve_keys: str | None = option(None, "data plane: directory with the CURVE pool keypair")
    data_peer_cidrs: str = option(
        "",
        "data plane: push frames only to peers in these networks (e.g. 10.0.0.0/8,fd00::/8); "
        "default: any address, which is safe only on a private network",
        parse=cidr_list,
    )
    data_max_message_mib: int = option(
        0,
        "data plane: largest message accepted, in MiB (default: derived from the model's size limits)",
        parse=non_negative_int,
    )
    session_idle_timeout: float = option(
        SESSION_IDLE_SECONDS,
        "seconds a control session may wait for its next command before the worker ends it",
        parse=positive_seconds,
    )
    session_begin_timeout: float = option(
        BEGIN_SECONDS,
        "seconds a new control session may take to send its Begin (the coordinator sends it at once)",
        parse=positive_seconds,
    )
    watchdog_seconds: float = option(
        WATCHDOG_SECONDS,
        "a command running longer is a stall: health and liveness turn NOT_SERVING until restart",
        parse=positive_seconds,
    )
    compile: str = option(
        "auto",
        "torch.compile the denoiser and its stages per shape (auto: reduce-overhead on CUDA, none "
        "on CPU); a worker is ready once its default size is compiled",
        choices=COMPILE_CHOICES,
    )

    @property
    def tls(self) -> tuple[str | None, str | None, str | None]:
        """(cert, key, client CA) of the control API, as ``hybridiff.serving`` takes them."""
        return (self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def data_max_message_bytes(self) -> int | None:
        """The data plane's largest message (None: derived from the model's size limits)."""
        return self.data_max_message_mib << 20 if self.data_max_message_mib else None
