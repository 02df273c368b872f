"""The worker's and the coordinator's options are declared once (``gpu_worker.config.WorkerConfig``,
``coordinator.config.CoordinatorConfig``): every field is a flag of its command, any config turns
into argv (``to_argv``, what the local cluster starts its processes with) that the command line
parses back into the same config, and a config built in code is checked by the flags' own parsers."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.config import CoordinatorConfig
from gpu_worker.config import WorkerConfig
from hybridiff import options
from hybridiff.errors import InvalidArgument
from hybridiff_launch.cli import build_parser
from hybridiff_launch.local_cluster import LocalCluster

# A value other than the default for every field (a new field needs one here).
WORKER = {
    "model": "org/name@main",
    "variant": "fp16",
    "hf_token_file": "/run/token",
    "config": "/models/pipeline",
    "text_encoder_3": True,
    "served_model_name": "sdxl",
    "host": "127.0.0.1",
    "advertise_host": "worker-0.workers",
    "port": 0,
    "data_port": 6000,
    "advertise_data_address": "tcp://10.0.0.7:7000",
    "metrics_port": 0,
    "worker_id": "w0",
    "device": "cuda:1",
    "dtype": "bfloat16",
    "cpus": "0-3",
    "ready_file": "/tmp/ready.json",
    "tls_cert": "/tls/cert.pem",
    "tls_key": "/tls/key.pem",
    "tls_client_ca": "/tls/ca.pem",
    "tls_client_name": "spiffe://pool/coordinator",
    "health_port": 0,
    "curve_keys": "/keys",
    "data_peer_cidrs": "10.0.0.0/8, fd00::/8",
    "data_max_message_mib": 64,
    "session_idle_timeout": 0.25,
    "session_begin_timeout": 1e-3,
    "watchdog_seconds": 12.5,
    "compile": "reduce-overhead",
}
COORDINATOR = {
    "host": "127.0.0.1",
    "port": 0,
    "metrics_port": 0,
    "discovery": "kubernetes",
    "workers": "10.0.0.1:50061,10.0.0.2:50061",
    "namespace": "serving",
    "selector": "app=worker",
    "worker_port": 7000,
    "health_port": 50053,
    "http_port": 8000,
    "queue_size": 0,
    "policy": "latency",
    "step_timeout": 0.5,
    "speculative_steps": False,
    "ready_file": "/tmp/ready.json",
    "l_slope": 3,
    "eps_slope": 1e-3,
    "k": 0,
    "tau_cap": 9,
    "refresh_every": 3,
    "tls_cert": "/tls/cert.pem",
    "tls_key": "/tls/key.pem",
    "tls_client_ca": "/tls/ca.pem",
    "auth_token_file": "/run/token",
    "worker_tls_ca": "/tls/worker-ca.pem",
    "worker_tls_cert": "/tls/client.pem",
    "worker_tls_key": "/tls/client.key",
    "worker_tls_name": "worker.pool",
    "admin_token_file": "/run/admin",
}
CONFIGS = {"worker": (WorkerConfig, WORKER), "coordinator": (CoordinatorConfig, COORDINATOR)}
CASES = [(command, name) for command, (_, samples) in CONFIGS.items() for name in sorted(samples)]


def parsed(command: str, argv: list[str]):
    return options.from_args(CONFIGS[command][0], build_parser().parse_args([command, *argv]))


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_has_a_sample_and_a_flag_in_the_help(command):
    config_type, samples = CONFIGS[command]
    assert sorted(f.name for f in dataclasses.fields(config_type)) == sorted(samples)
    text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
    for f in dataclasses.fields(config_type):
        assert options.flag_names(f)[0] in text, f.name


@pytest.mark.parametrize(("command", "name"), CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_each_field_round_trips_through_argv(command, name):
    config_type, samples = CONFIGS[command]
    config = config_type(**{name: samples[name]})
    argv = options.to_argv(config)
    assert len(argv) == 2 and parsed(command, argv) == config


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_a_config_of_every_field_round_trips_and_the_defaults_give_no_flags(command):
    config_type, samples = CONFIGS[command]
    config = config_type(**samples)
    assert parsed(command, options.to_argv(config)) == config
    assert options.to_argv(config_type()) == [] and parsed(command, []) == config_type()


def test_a_flags_aliases_parse_into_its_field():
    got = parsed("worker", ["--model-dir", "m", "--model-name", "n"])
    assert got == WorkerConfig(model="m", served_model_name="n")


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("watchdog_seconds", 0.0, "watchdog-seconds"),
        ("session_idle_timeout", float("nan"), "session-idle-timeout"),
        ("data_peer_cidrs", "10.0.0.0/33", "data-peer-cidrs"),
        ("data_max_message_mib", -1, "data-max-message-mib"),
        ("compile", "fast", "compile"),
        ("queue_size", -1, "queue-size"),
        ("step_timeout", float("inf"), "step-timeout"),
        ("policy", "fastest", "policy"),
    ],
)
def test_a_bad_value_in_code_is_refused_as_its_flag_would_be(field, value, flag):
    config_type = WorkerConfig if field in WORKER else CoordinatorConfig
    with pytest.raises(InvalidArgument) as err:
        config_type(**{field: value})
    assert err.value.field == flag


def test_the_local_cluster_starts_its_workers_with_their_config(tmp_path):
    cluster = LocalCluster(tmp_path, variant="fp16", text_encoder_3=True, compile_mode="none")
    config = dataclasses.replace(cluster.worker_config, cpus="0", device="cpu", worker_id="worker0")
    got = parsed("worker", options.to_argv(config))
    assert got == config and got.model == str(tmp_path) and got.text_encoder_3 and got.compile == "none"
    assert (got.port, got.data_port, got.metrics_port, got.data_peer_cidrs) == (0, 0, 0, "127.0.0.0/8")


def test_the_worker_flag_defaults_are_the_services_own():
    """One default each: ``hybridiff worker`` without --watchdog-seconds waits 600 s, as the
    service's constant, the README and the changelog say (the flag said 300 while both said 600)."""
    from gpu_worker import config

    got = parsed("worker", [])
    assert (got.watchdog_seconds, got.session_idle_timeout, got.session_begin_timeout) == (600.0, 60.0, 5.0)
    assert got.watchdog_seconds == config.WATCHDOG_SECONDS
