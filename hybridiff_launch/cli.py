"""The ``hybridiff`` command line (docs/design.md section 3).

Exit codes: 0 ok; 2 bad usage or an invalid argument; 3 the service is unavailable or the
deadline passed; 4 any other server error; 130 interrupted. Serving commands import their role
only when run, so the client commands start fast and work where only the light client is
installed. The tool commands (bench, gpu-profile, train-default-model, adherence) are found
through the ``hybridiff.tools`` entry points: the launch layer never imports the tools.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

import grpc
from tqdm import tqdm

from coordinator.config import CoordinatorConfig
from gpu_worker.config import WorkerConfig
from hybridiff import logs, options, security, telemetry
from hybridiff.client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    DiffusionClient,
    default_target,
)
from hybridiff.errors import DeadlineExceeded, HybridiffError, InvalidArgument, ModelLoadError, Unavailable
from hybridiff.options import positive_seconds
from hybridiff.protocol import Mode, OutputFormat, Phase, WindowGuidance, label, labels
from hybridiff.protojson import message_json, response_json
from hybridiff.request import request_from_names
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.children import die_with_launcher
from hybridiff_launch.model_dirs import (
    add_model_flags,
    default_model_dir,
    resolve_config,
    resolve_model,
    text_encoder_3,
)

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_SERVER_ERROR, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
TOOLS_GROUP = "hybridiff.tools"
OUR_PACKAGES = {"hybridiff", "coordinator", "gpu_worker", "hybridiff_launch", "hybridiff_tools"}


def exit_code(exc: HybridiffError) -> int:
    if isinstance(exc, (InvalidArgument, ModelLoadError)) or exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        return EXIT_USAGE  # a bad flag, field or --model-dir
    if isinstance(exc, (Unavailable, DeadlineExceeded)) or exc.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        return EXIT_UNAVAILABLE
    return EXIT_SERVER_ERROR


def package_version() -> str:
    try:
        return version("hybridiff")
    except PackageNotFoundError:
        return "unknown"


# --- flags ------------------------------------------------------------------------------
def add_generation_flags(p: argparse.ArgumentParser, request_model: bool = True) -> None:
    """The generation flags shared by ``run`` and ``generate`` (``request_model``: the request's
    ``--model``, the served name; ``run`` has its own ``--model``, the weights)."""
    p.add_argument("--prompt", required=True, help="what to draw (at most 4000 characters)")
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="what to steer away from (default: none; an empty string is encoded as such)",
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps, 1..500 (default: the model's)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale, 0..100; <= 1 runs one branch only (default: the model's)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the initial noise, as diffusers' Generator('cpu').manual_seed (default: random, "
        "reported in the stats)",
    )
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument(
        "--num-images",
        type=int,
        default=1,
        help="images of the prompt, as diffusers' num_images_per_prompt; the outputs are numbered "
        "OUT-0.png, OUT-1.png, ... when more than one",
    )
    p.add_argument(
        "--mode",
        choices=labels(Mode),
        default="auto",
        help="auto: hybrid when a pair is free and guidance > 1; single: one worker (the baseline); "
        "cfg-parallel: one guidance branch per worker; pipeline: two-stage pipeline (AsyncDiff); "
        "hybrid: cfg-parallel, the pipeline from tau1 to tau2, cfg-parallel again",
    )
    if request_model:
        p.add_argument(
            "--model",
            dest="request_model",
            default="",
            help="the served model's name (default: the only one)",
        )
    p.add_argument(
        "--l-slope",
        type=int,
        default=None,
        help="hybrid: L, the window of the rel-MAE slope in steps. rel-MAE = mean|e_c - e_u| / mean|e_u|, "
        "the relative gap between the conditional and unconditional predictions (default: the model's)",
    )
    p.add_argument(
        "--eps-slope",
        type=float,
        default=None,
        help="hybrid: tau1, the step the pipeline window opens, is the first step where the rel-MAE slope "
        "(d[-L] - d[-1]) / L lies in [0, eps_slope) (default: the model's)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="hybrid: the window's length after tau1; tau2 = min(tau1 + k, last step) (default: the model's)",
    )
    p.add_argument(
        "--tau-cap",
        type=int,
        default=None,
        help="hybrid: tau1 when the slope never flattens (default: the model's)",
    )
    p.add_argument(
        "--refresh-every",
        type=int,
        default=None,
        help="refreshed-difference, extrapolated-difference: every this many window steps, from its "
        "first, both branches run and measure e_c - e_u again (default: the model's)",
    )
    p.add_argument(
        "--window-guidance",
        choices=["default", *labels(WindowGuidance)],
        default="default",
        help="the pipeline window's prediction: conditional (hybrid's default), last-difference "
        "(e_c + (s - 1) times the last measured e_c - e_u), full-cfg (pipeline's default), "
        "refreshed-difference (last-difference, measured again every --refresh-every steps) or "
        "extrapolated-difference (refreshed, carried along its damped trend)",
    )
    p.add_argument("--format", choices=labels(OutputFormat), default="png", help="the output's encoding")
    p.add_argument("--quality", type=int, default=0, help="JPEG/WebP quality, 1..100 (default 90)")
    p.add_argument("--request-id", default="", help="your id for the request (default: one is assigned)")
    p.add_argument("--out", required=True, help="where to write the image (-: to stdout, alone there)")
    p.add_argument("--stats-json", default=None, help="also write the run's statistics as JSON here")


def check_out(args: argparse.Namespace) -> None:
    """``--out -`` (the image on stdout) takes one image: refused before anything runs."""
    if args.out == "-" and args.num_images != 1:
        raise InvalidArgument("out", f"--out - writes one image to stdout, not {args.num_images}")


def emit_outputs(args: argparse.Namespace, images: list[bytes], stats: dict) -> None:
    """Write the outputs; with ``--out -`` the image's bytes are all that stdout carries (the
    ``wrote`` line of ``--stats-json`` goes to stderr)."""
    if args.out != "-":
        write_outputs(args, images, stats)
        return
    sys.stdout.buffer.write(images[0])
    sys.stdout.flush()
    if args.stats_json:
        with contextlib.redirect_stdout(sys.stderr):
            write_outputs(argparse.Namespace(out="", stats_json=args.stats_json), [], stats)


def request_input(args: argparse.Namespace) -> pb.GenerateRequest:
    return request_from_names(
        args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        mode=args.mode,
        hybrid={
            "l_slope": args.l_slope,
            "eps_slope": args.eps_slope,
            "k": args.k,
            "tau_cap": args.tau_cap,
            "refresh_every": args.refresh_every,
        },
        window_guidance=args.window_guidance,
        output_format=args.format,
        quality=args.quality,
        num_images=args.num_images,
        request_id=args.request_id,
        model=getattr(args, "request_model", ""),
    )


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def write_file(path: Path, data: bytes, flag: str) -> None:
    """Write ``data`` to ``path`` (its folders made); a path that cannot be written is the flag's
    usage error (one line, exit 2), not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise InvalidArgument(flag, f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"wrote {path}")


def write_outputs(args: argparse.Namespace, images: list[bytes], stats: dict) -> None:
    """The images first, then the statistics: an unwritable --stats-json still leaves the images."""
    for path, data in zip(output_paths(args.out, len(images)), images):
        write_file(path, data, "out")
    if args.stats_json:
        write_file(Path(args.stats_json), json.dumps(stats, indent=2).encode(), "stats-json")


# --- serving commands -------------------------------------------------------------------
def cmd_tiny_model(args: argparse.Namespace) -> int:
    from hybridiff_launch.tiny_model import write_tiny_model  # deferred: torch and diffusers, slow to import

    out = write_tiny_model(args.arch, args.out, seed=args.seed, size=args.size)
    print(f"wrote {args.size} {args.arch} model to {out}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # deferred: the engine imports torch and diffusers (seconds), which client commands never need.
    from coordinator.service import response_to_proto
    from hybridiff_launch.inprocess import InProcessEngine

    model_dir, _ = resolve_model(args)
    engine = InProcessEngine(
        model_dir,
        args.device,
        args.dtype,
        args.split_cut,
        compile=args.compile,
        variant=args.variant,
        text_encoder_3=text_encoder_3(args),
        config=resolve_config(args),
    )
    try:
        check_out(args)
        spec = engine.resolve(request_input(args))
        quiet = args.quiet or not sys.stderr.isatty()  # a bar only on a terminal
        with tqdm(total=spec.num_steps, desc=label(spec.mode), unit="step", disable=quiet) as bar:

            def on_step(stat, total):
                bar.set_postfix_str(
                    label(stat.phase) + (f" rel-MAE {stat.rel_mae:.4f}" if stat.rel_mae is not None else "")
                )
                bar.update(1)

            result = engine.generate(spec, on_step=on_step)
    finally:
        engine.close()
    images = result.images or [result.latents.data]
    # The statistics as the public API gives them: one --stats-json format for run and generate.
    response = response_to_proto(result, spec.width, spec.height, spec.output_format)
    emit_outputs(args, images, response_json(response))
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from gpu_worker.process import serve_worker  # deferred: the worker role (torch, diffusers, zmq)

    # A Hub id is fetched by the worker, before it serves (and --config's, as the model is).
    serve_worker(options.from_args(WorkerConfig, args, model=args.model or str(default_model_dir())))
    return EXIT_OK


def cmd_coordinator(args: argparse.Namespace) -> int:
    config = options.from_args(CoordinatorConfig, args)
    if config.discovery == "static" and not config.workers:
        print("error: --workers HOST:PORT,... is required with --discovery static", file=sys.stderr)
        return EXIT_USAGE
    # deferred: the coordinator role (prometheus, the OpenTelemetry SDK, the kubernetes client).
    from coordinator.server import serve_configured

    serve_configured(config)
    return EXIT_OK


def cmd_local(args: argparse.Namespace) -> int:
    # deferred: builds the default model with torch if needed
    from hybridiff_launch.local_cluster import parse_devices, run_local

    devices = parse_devices(args.devices) if args.devices is not None else None
    model_dir, served_name = resolve_model(args)  # fetched once, here, not by each worker
    return run_local(
        str(model_dir),
        args.workers,
        args.port,
        args.metrics_port,
        args.queue_size,
        args.policy,
        log_format=args.log_format,
        log_dir=args.log_dir,
        verbose=args.verbose,
        devices=devices,
        compile_mode=args.compile,
        served_model_name=served_name,
        variant=args.variant,
        http_port=args.http_port or None,
        text_encoder_3=text_encoder_3(args),
        config=resolve_config(args),
    )


def cmd_download(args: argparse.Namespace) -> int:
    from gpu_worker import weights  # deferred: huggingface_hub, a server dependency

    source = weights.parse_model(args.model, args.revision)
    if source.repo_id is None:
        raise InvalidArgument("model", f"{args.model!r} is a local path; download takes a Hub id ORG/NAME")
    folder = weights.fetch(
        source.repo_id,
        source.revision,
        variant=args.variant,
        with_t5=args.with_t5,
        token=weights.read_token(args.hf_token_file),
        refresh=True,
    )
    print(folder)
    return EXIT_OK


def cmd_curve_keys(args: argparse.Namespace) -> int:
    out = security.write_curve_keys(args.out)
    print(f"wrote the CURVE pool keypair to {out} (pool.key, pool.key_secret); mount it on every worker")
    return EXIT_OK


# --- client commands --------------------------------------------------------------------
def client_for(args: argparse.Namespace) -> DiffusionClient:
    return DiffusionClient(
        args.target,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=security.read_token(args.auth_token_file, env="HYBRIDIFF_AUTH_TOKEN"),
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    # The CLI is an application: it configures the OpenTelemetry SDK (from OTEL_* variables) when installed.
    telemetry.setup_tracing_if_installed("hybridiff-client")
    check_out(args)
    request = request_input(args)
    show_bar = not args.quiet and sys.stderr.isatty()  # never into a pipe or a log file
    bars: list[tqdm] = []  # made at the first progress event: once the request is accepted

    def on_progress(p) -> None:
        if not show_bar:
            return
        if not bars:
            bars.append(tqdm(total=p.total_steps, unit="step", file=sys.stderr))
        bars[0].set_postfix_str(
            label(Phase(p.phase)) + (f" rel-MAE {p.rel_mae:.4f}" if p.HasField("rel_mae") else "")
        )
        bars[0].update(1)

    with client_for(args) as client:
        try:
            response = client.generate_request(request, on_progress=on_progress)
        finally:
            for bar in bars:
                bar.close()
            telemetry.shutdown_tracing()
    emit_outputs(args, [image.data for image in response.images], response_json(response))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        models = client.list_models()
    print(json.dumps([message_json(m) for m in models], indent=2))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        status = client.cluster_status()
    print(json.dumps(message_json(status), indent=2))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from hybridiff_launch.predict import run  # deferred: the coordinator's schedule model

    return run(args)


def add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=default_target(),
        help="HOST:PORT of the coordinator (default: $HYBRIDIFF_TARGET, else 127.0.0.1:50051)",
    )
    p.add_argument(
        "--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, help="deadline of the call in seconds"
    )
    p.add_argument(
        "--connect-timeout",
        type=positive_seconds,
        default=DEFAULT_CONNECT_TIMEOUT,
        help="give up after this many seconds when the target cannot be reached",
    )
    p.add_argument("--tls-ca", default=None, help="TLS: the coordinator's CA certificate (PEM)")
    p.add_argument("--tls-cert", default=None, help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="mutual TLS: this client's key (PEM)")
    p.add_argument(
        "--auth-token-file", default=None, help="bearer token file (default: $HYBRIDIFF_AUTH_TOKEN if set)"
    )


# --- the parser -------------------------------------------------------------------------
# `hybridiff --help` lists the user's commands in this order, then the developer tools apart.
USER_COMMANDS = (
    "local",
    "generate",
    "models",
    "status",
    "run",
    "download",
    "worker",
    "coordinator",
    "curve-keys",
    "loadtest",
    "gpu-check",
    "predict",
)
DEVELOPER_TOOLS = {
    "tiny-model": None,  # built in: its own help
    "train-default-model": "train the embedded default model (models/shapes-sdxl) on CPU",
    "adherence": "the default model's held-out prompt adherence and rel-MAE curves",
    "bench": "every mode side by side through the service: latency, speedup, image agreement",
    "gpu-profile": "GPU profile of full-size SDXL / SD3 denoisers and the two-GPU latency it predicts",
    "load-sweep": "latency and SLO attainment against offered load, per allocation policy",
    "poolsim": "the allocation policies on simulated GPU pools",
    "frontier": "quality against speedup of every window policy at every window length",
    "chaos": "a load test on a local cluster while workers and a coordinator are killed, stopped and cut off",
}
TOOL_HELP = {
    "loadtest": "load a running service (gRPC or HTTP) at a rate or a concurrency: latency, SLO",
    "gpu-check": "every mode end to end on this host's GPU(s), checked against single",
    "calibrate": "measure each window policy's quality per window length; record it in its hybridiff.json",
}
NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an unknown flag is reported with this command's usage and the
    closest of its flags ("did you mean --prompt?"), also when its misspelling hid a required
    flag (``--promt x`` is reported as such, not as a missing ``--prompt``)."""

    _argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def unknown_flags(self, argv: list[str]) -> list[str]:
        known = [o for o in self._option_string_actions if o.startswith("--")]
        found = []
        for token in argv:
            if token == "--":
                break
            flag = token.split("=", 1)[0]
            if not flag.startswith("-") or flag == "-" or NUMBER.match(flag):
                continue
            if flag in self._option_string_actions:
                continue
            if flag.startswith("--") and sum(o.startswith(flag) for o in known) == 1:
                continue  # an unambiguous abbreviation: argparse takes it
            found.append(flag)
        return found

    def suggest(self, flag: str) -> str:
        known = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return f"{flag} (did you mean {close[0]}?)" if close else flag

    def error(self, message: str):
        unknown = self.unknown_flags(self._argv)
        if unknown:
            message = "unrecognized arguments: " + ", ".join(self.suggest(f) for f in unknown)
        super().error(message)


def group_commands(parser: argparse.ArgumentParser, sub) -> None:
    """Show the user's commands first, in USER_COMMANDS order, and the developer tools in a group
    of their own (every command still parses as before)."""
    listed = {action.dest: action for action in sub._choices_actions}
    order = [name for name in USER_COMMANDS if name in listed]
    order += [name for name in listed if name not in order and name not in DEVELOPER_TOOLS]
    sub._choices_actions[:] = [listed[name] for name in order]
    tools = parser.add_argument_group(
        "developer tools", "building the default model, benchmarks and simulations (not needed to serve)"
    )
    for name, help_text in DEVELOPER_TOOLS.items():
        if name in listed:
            if help_text:
                listed[name].help = help_text
            tools._group_actions.append(listed[name])


def tool_commands() -> dict[str, object]:
    """The tool commands installed as ``hybridiff.tools`` entry points (name -> entry point)."""
    return {ep.name: ep for ep in entry_points(group=TOOLS_GROUP)}


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    options.add_flags(p, WorkerConfig, only=["compile"])


def add_log_format_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="text, or json: one object per line (ts, level, logger, message, request_id, trace_id)",
    )


def build_parser(tools: dict[str, object] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridiff",
        description="Serve diffusion models on pairs of workers (hybrid data-pipeline parallelism). "
        "Start with `hybridiff local`, then `hybridiff generate --prompt ... --out image.png`; "
        "`hybridiff COMMAND --help` for a command's flags.",
        epilog="Exit codes: 0 ok, 2 bad usage or invalid argument, 3 unavailable or "
        "deadline exceeded, 4 other server error, 130 cancelled (Ctrl-C).",
    )
    parser.add_argument("--version", action="version", version=f"hybridiff {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND", parser_class=CommandParser
    )

    p = sub.add_parser("tiny-model", help="write a small random SDXL- or SD3-shaped model (diffusers format)")
    p.add_argument("--arch", required=True, choices=("sdxl", "sd3"), help="the architecture")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--size",
        choices=("tiny", "bench"),
        default="tiny",
        help="tiny: for tests; bench: the ~30M-parameter benchmark UNet",
    )
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("run", help="the engine in one process, no servers")
    add_model_flags(p, served_name=False, load_options=True)
    options.add_flags(p, WorkerConfig, only=["device", "dtype"])
    p.add_argument(
        "--split-cut", type=int, default=None, help="stage cut (default: balanced by measured cost)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_flag(p)
    add_generation_flags(p, request_model=False)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="one GPU worker: control API over gRPC, data plane over ZeroMQ")
    options.add_flags(p, WorkerConfig)
    add_log_format_flag(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("coordinator", help="the public API, admission queue, pair allocator and monitor")
    options.add_flags(p, CoordinatorConfig)
    add_log_format_flag(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("local", help="coordinator + workers as local processes (the embedded default)")
    add_model_flags(p, load_options=True)
    p.add_argument("--workers", type=int, default=2, help="how many workers (each gets its own cores)")
    p.add_argument(
        "--devices",
        default=None,
        help="the workers' devices, round robin (e.g. cuda:0,cuda:1; cpu,cpu); default: one per visible "
        "GPU, round robin (two workers may share one), else cpu",
    )
    p.add_argument("--port", type=int, default=50051, help="public API port")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port")
    p.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="the OpenAI-compatible HTTP API and the playground page (http://127.0.0.1:PORT/) (0: off)",
    )
    options.add_flags(p, CoordinatorConfig, only=["queue_size", "policy"])
    add_log_format_flag(p)
    p.add_argument(
        "--log-dir", default=None, help="write each process's log here (default: a new temporary directory)"
    )
    add_compile_flag(p)
    p.set_defaults(func=cmd_local)

    p = sub.add_parser(
        "download",
        help="fetch the files of a Hub model that the workers load into the Hub cache (HF_HOME)",
    )
    p.add_argument("model", help="the Hub id, ORG/NAME[@REV]")
    p.add_argument("--revision", default=None, help="a branch, tag or commit (default: @REV, else main)")
    p.add_argument(
        "--variant", default=None, help="the weights' variant (fp16: the *.fp16.safetensors files)"
    )
    p.add_argument("--with-t5", action="store_true", help="SD3: the T5 text encoder too")
    p.add_argument(
        "--hf-token-file",
        default=None,
        help="a Hub token for gated or private repositories (default: $HF_TOKEN or a stored login)",
    )
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("generate", help="send one request to a running service")
    add_client_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_generation_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list the models a running service serves, with their limits (JSON)")
    add_client_flags(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("status", help="a running service's workers and queue (JSON)")
    add_client_flags(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "predict", help="what AUTO would run on a profiled GPU, and its predicted speedup (no GPU needed)"
    )
    p.add_argument("--profile", required=True, help="a GPU profile (hybridiff gpu-profile --out FILE)")
    p.add_argument("--arch", required=True, choices=("sdxl", "sd3"), help="the profiled denoiser to price")
    p.add_argument(
        "--model",
        help="the model folder whose calibration and defaults bound the windows (default: the embedded one)",
    )
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("curve-keys", help="create the ZeroMQ CURVE keypair the workers of a pool share")
    p.add_argument("--out", required=True, help="directory to write pool.key and pool.key_secret into")
    p.set_defaults(func=cmd_curve_keys)

    for name, ep in sorted((tools or {}).items()):
        help_text = TOOL_HELP.get(name) or DEVELOPER_TOOLS.get(name) or f"a tool ({ep.value})"
        sub.add_parser(name, add_help=False, help=help_text)
    group_commands(parser, sub)
    return parser


def missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """The one line to print when ``command`` needs a dependency that only an extra installs
    (a plain ``pip install hybridiff`` is the client); None when the missing module is our own."""
    name = (exc.name or "").split(".")[0]
    if not name or name in OUR_PACKAGES:
        return None
    extra = "bench" if name == "matplotlib" else "server"
    return (
        f"error: `hybridiff {command}` needs the {extra} extras (no module {name}): "
        f"pip install 'hybridiff[{extra}]'"
    )


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()  # a child of the local cluster: ends with it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time chatter on a CLI
    argv = sys.argv[1:] if argv is None else argv
    tools = tool_commands()
    try:
        if argv and argv[0] in tools:  # a tool parses its own arguments
            logging.basicConfig(
                level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
            return tools[argv[0]].load()(argv[1:])
        parser = build_parser(tools)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # the subcommand's usage and a suggestion, not the top-level usage
            command = parser._subparsers._group_actions[0].choices[args.command]
            command.error("unrecognized arguments: " + " ".join(unknown))
        logs.setup_logging(
            getattr(args, "log_format", "text"), logging.INFO if args.verbose else logging.WARNING
        )
        logging.getLogger("gpu_worker.weights").setLevel(logging.INFO)  # a fetch's progress, always
        return args.func(args)
    except HybridiffError as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return exit_code(exc)
    except ModuleNotFoundError as exc:
        line = missing_extra(exc, argv[0] if argv else "")
        if line is None:
            raise
        print(line, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C: a call in flight is cancelled as the channel closes
        print("cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
