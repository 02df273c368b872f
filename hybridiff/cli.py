"""The ``hybridiff`` command line (DESIGN section 3)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hybridiff.errors import HybridiffError
from hybridiff.request import MODES, WINDOW_GUIDANCE, RequestInput

DEFAULT_MODEL_ENV = "HYBRIDIFF_MODEL_DIR"
# The trained default model (hybridiff train-default-model), committed next to the packages.
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-sdxl"


def default_model_dir() -> Path:
    """The embedded default model: ``$HYBRIDIFF_MODEL_DIR``, else the trained shapes model
    committed in the repository (``models/shapes-sdxl``), else — in an install without the
    repository — a tiny random SDXL model built once into the user cache (no download)."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return Path(env)
    if (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        return EMBEDDED_MODEL_DIR
    cache = tiny_model_cache() / "tiny-sdxl"
    if not (cache / "model_index.json").is_file():
        from hybridiff.tiny_model import write_tiny_model

        print(f"no embedded model at {EMBEDDED_MODEL_DIR}; building a tiny random SDXL model in {cache}",
              file=sys.stderr)
        write_tiny_model("sdxl", cache)
    return cache


def tiny_model_cache() -> Path:
    """Where the benchmark and other helpers keep the models they build."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybridiff"


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The generation flags shared by ``run`` and ``generate``."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--model", default="", help="model name (cluster: which served model)")
    p.add_argument("--l-slope", type=int, default=None)
    p.add_argument("--eps-slope", type=float, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--tau-cap", type=int, default=None)
    p.add_argument("--window-guidance", choices=WINDOW_GUIDANCE, default="default")
    p.add_argument("--request-id", default="")
    p.add_argument("--out", required=True, help="where to write the PNG")
    p.add_argument("--stats-json", default=None, help="also write the run's statistics as JSON")


def request_input(args: argparse.Namespace) -> RequestInput:
    return RequestInput(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, mode=args.mode,
        l_slope=args.l_slope, eps_slope=args.eps_slope, k=args.k, tau_cap=args.tau_cap,
        window_guidance=args.window_guidance, request_id=args.request_id, model=args.model,
    )


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from hybridiff.tiny_model import write_tiny_model

    out = write_tiny_model(args.arch, args.out, seed=args.seed, size=args.size)
    print(f"wrote {args.size} {args.arch} model to {out}")
    return 0


def cmd_train_default_model(args: argparse.Namespace) -> int:
    from hybridiff.shapes.train import TrainConfig, train_default_model

    overrides = {"unet_steps": args.steps, "vae_steps": args.vae_steps, "threads": args.threads}
    config = TrainConfig(seed=args.seed, **{k: v for k, v in overrides.items() if v is not None})
    record = train_default_model(args.out, config, progress=lambda line: print(line, flush=True),
                                 checkpoint_dir=args.checkpoint_dir)
    print(f"wrote the trained model to {args.out} in {record['seconds'] / 60:.1f} min")
    return 0


def cmd_adherence(args: argparse.Namespace) -> int:
    from hybridiff.shapes.evaluate import study

    study(args.model_dir or default_model_dir(), args.out_dir, steps=args.steps, curve_steps=args.curve_steps,
          guidances=tuple(args.guidance), progress=lambda line: print(line, flush=True))
    print(f"wrote {args.out_dir}/evaluation.json and its plots")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from coordinator.inprocess import InProcessEngine

    engine = InProcessEngine(args.model_dir or default_model_dir(), args.device, args.dtype, args.split_cut)
    try:
        spec = engine.resolve(request_input(args))
        with tqdm(total=spec.num_steps, desc=spec.mode, unit="step", disable=args.quiet) as bar:
            def on_step(stat, total):
                bar.set_postfix_str(stat.phase + (f" rel-MAE {stat.rel_mae:.4f}" if stat.rel_mae is not None else ""))
                bar.update(1)

            result = engine.generate(spec, on_step=on_step)
    finally:
        engine.close()
    write_outputs(args, result.image_png, result.latents, result.stats.to_dict())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from gpu_worker.server import pin_cpus, serve_worker

    pin_cpus(args.cpus)
    serve_worker(args.model_dir or str(default_model_dir()), args.port, args.data_port, host=args.host,
                 advertise_host=args.advertise_host, device=args.device, dtype=args.dtype,
                 model_name=args.model_name, worker_id=args.worker_id, ready_file=args.ready_file,
                 tls=(args.tls_cert, args.tls_key, args.tls_client_ca), curve_keys_dir=args.curve_keys)
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.server import serve_coordinator
    from coordinator.service import ServiceConfig
    from hybridiff import security

    if args.discovery == "kubernetes":
        from coordinator.discovery.kubernetes import KubernetesDiscovery

        discovery = KubernetesDiscovery(args.namespace, args.selector, args.worker_port)
    else:
        if not args.workers:
            print("error: --workers HOST:PORT,... is required with --discovery static", file=sys.stderr)
            return 2
        discovery = None
    serve_coordinator(workers=(args.workers or "").split(","), discovery=discovery, host=args.host, port=args.port,
                      metrics_port=args.metrics_port, queue_size=args.queue_size,
                      config=ServiceConfig(step_timeout=args.step_timeout, hybrid_defaults={
                          "l_slope": args.l_slope, "eps_slope": args.eps_slope, "k": args.k, "tau_cap": args.tau_cap}),
                      ready_file=args.ready_file, tls=(args.tls_cert, args.tls_key, args.tls_client_ca),
                      token=security.read_token(args.auth_token_file, env="HYBRIDIFF_AUTH_TOKEN"),
                      worker_credentials=security.channel_credentials(args.worker_tls_ca, args.worker_tls_cert,
                                                                      args.worker_tls_key))
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from hybridiff.launcher import run_local

    return run_local(str(args.model_dir or default_model_dir()), args.workers, args.port, args.metrics_port,
                     args.queue_size)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from hybridiff.client import DiffusionClient

    from hybridiff import security

    client = DiffusionClient(args.target, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                             token=security.read_token(args.auth_token_file, env="HYBRIDIFF_AUTH_TOKEN"))
    bar = tqdm(unit="step", disable=args.quiet)

    def on_progress(p) -> None:
        bar.total = p.total_steps
        phase = ("single", "data-parallel", "pipeline-fill", "pipeline")[max(0, p.phase - 1)]
        bar.set_postfix_str(phase + (f" rel-MAE {p.rel_mae:.4f}" if p.HasField("rel_mae") else ""))
        bar.update(1)

    try:
        response = client.generate(request_input(args), timeout=args.timeout, on_progress=on_progress)
    except grpc.RpcError as err:
        bar.close()
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()
    bar.close()
    from google.protobuf.json_format import MessageToDict

    stats = MessageToDict(response.stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(response.image)
    print(f"wrote {out}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2))
        print(f"wrote {args.stats_json}")
    return 0


def write_outputs(args: argparse.Namespace, image_png: bytes | None, latents, stats: dict) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if image_png is not None:
        out.write_bytes(image_png)
    else:
        out.write_bytes(latents.numpy().astype("<f4").tobytes())
    print(f"wrote {out}")
    if args.stats_json:
        Path(args.stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.stats_json).write_text(json.dumps(stats, indent=2))
        print(f"wrote {args.stats_json}")


def cmd_curve_keys(args: argparse.Namespace) -> int:
    from hybridiff.security import write_curve_keys

    out = write_curve_keys(args.out)
    print(f"wrote the CURVE pool keypair to {out} (pool.key, pool.key_secret); mount it on every worker")
    return 0


def cmd_gpu_profile(argv: list[str]) -> int:
    from hybridiff.bench.gpu_profile import main as gpu_profile_main

    return gpu_profile_main(argv)


def cmd_bench(argv: list[str]) -> int:
    from hybridiff.bench.runner import main as bench_main

    return bench_main(argv)


# Subcommands with parsers of their own: everything after the name is theirs.
DELEGATED = {"gpu-profile": cmd_gpu_profile, "bench": cmd_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write a small random SDXL- or SD3-shaped model (diffusers format)")
    p.add_argument("--arch", required=True, choices=("sdxl", "sd3"))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("train-default-model",
                       help="train the embedded default model (coloured shapes, SDXL architecture) on CPU")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoiser training steps (default 3600)")
    p.add_argument("--vae-steps", type=int, default=None, help="autoencoder training steps (default 2000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument("--checkpoint-dir", default=None, help="also write EMA snapshots here every 1000 steps")
    p.set_defaults(func=cmd_train_default_model)

    p = sub.add_parser("adherence", help="the default model's prompt adherence on held-out prompts, and its "
                                         "rel-MAE curve (in-process)")
    p.add_argument("--model-dir", default=None, help="diffusers model directory (default: the embedded model)")
    p.add_argument("--out-dir", default="docs/default_model")
    p.add_argument("--steps", type=int, default=30, help="denoising steps of the adherence images")
    p.add_argument("--curve-steps", type=int, default=50, help="denoising steps of the rel-MAE curves")
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0, 1.0])
    p.set_defaults(func=cmd_adherence)

    p = sub.add_parser("run", help="the engine in one process, no servers")
    p.add_argument("--model-dir", default=None, help="diffusers model directory (default: the embedded tiny model)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--split-cut", type=int, default=None, help="stage cut (default: balanced by measured cost)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_generation_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="one GPU worker: control API over gRPC, data plane over ZeroMQ")
    p.add_argument("--model-dir", default=None, help="diffusers model directory (default: the embedded tiny model)")
    p.add_argument("--model-name", default=None, help="name clients use (default: the directory name)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--advertise-host", default=None, help="host peers reach this worker at (default: hostname)")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--data-port", type=int, default=50062)
    p.add_argument("--worker-id", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--cpus", default=None, help="pin to these cores (e.g. 0 or 0-3), one torch thread per core")
    p.add_argument("--ready-file", default=None, help="write the bound addresses here as JSON once serving")
    p.add_argument("--tls-cert", default=None, help="control API: TLS certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="control API: TLS private key (PEM)")
    p.add_argument("--tls-client-ca", default=None,
                   help="control API: accept only clients (the coordinator) with a certificate from this CA")
    p.add_argument("--curve-keys", default=None, help="data plane: directory with the CURVE pool keypair")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("coordinator", help="the public API, admission queue, pair allocator and monitor")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9090)
    p.add_argument("--discovery", choices=("static", "kubernetes"), default="static")
    p.add_argument("--workers", default="", help="static discovery: HOST:PORT,... of the workers' control APIs")
    p.add_argument("--namespace", default="default", help="kubernetes discovery: namespace of the worker pods")
    p.add_argument("--selector", default="app.kubernetes.io/component=worker", help="kubernetes discovery: label selector")
    p.add_argument("--worker-port", type=int, default=50061, help="kubernetes discovery: workers' control port")
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--step-timeout", type=float, default=600.0, help="seconds to wait for one step before failing")
    p.add_argument("--ready-file", default=None, help="write the bound ports here as JSON once serving")
    p.add_argument("--l-slope", type=int, default=None, help="override every model's default L_slope")
    p.add_argument("--eps-slope", type=float, default=None, help="override every model's default eps_slope")
    p.add_argument("--k", type=int, default=None, help="override every model's default k")
    p.add_argument("--tau-cap", type=int, default=None, help="override every model's default tau_cap")
    p.add_argument("--tls-cert", default=None, help="public API: TLS certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="public API: TLS private key (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="public API: require client certificates from this CA")
    p.add_argument("--auth-token-file", default=None,
                   help="public API: require this bearer token (default: $HYBRIDIFF_AUTH_TOKEN if set)")
    p.add_argument("--worker-tls-ca", default=None, help="control channels: CA of the workers' certificates")
    p.add_argument("--worker-tls-cert", default=None, help="control channels: the coordinator's client certificate")
    p.add_argument("--worker-tls-key", default=None, help="control channels: the coordinator's client key")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("local", help="coordinator + workers as local processes (the embedded default)")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9090)
    p.add_argument("--queue-size", type=int, default=16)
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("generate", help="send one request to a running service")
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the coordinator")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--tls-ca", default=None, help="TLS: the coordinator's CA certificate")
    p.add_argument("--tls-cert", default=None, help="mutual TLS: this client's certificate")
    p.add_argument("--tls-key", default=None, help="mutual TLS: this client's key")
    p.add_argument("--auth-token-file", default=None, help="bearer token (default: $HYBRIDIFF_AUTH_TOKEN if set)")
    p.add_argument("--quiet", action="store_true")
    add_generation_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("curve-keys", help="create the ZeroMQ CURVE keypair the workers of a pool share")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_curve_keys)

    sub.add_parser("gpu-profile", add_help=False,
                   help="time full-size SDXL/SD3 denoisers per stage and predict two-GPU latency (see --help)")
    sub.add_parser("bench", add_help=False, help="all modes side by side through the service (see --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time chatter on a CLI
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            return DELEGATED[argv[0]](argv[1:])
        except HybridiffError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except HybridiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
