"""The worker's options are declared once (``gpu_worker.config.WorkerConfig``): every field is a
``hybridiff worker`` flag, any config turns into argv (``to_argv``, what the local cluster starts
its workers with) that the command line parses back into the same config, and a config built in
code is checked by the flags' own parsers."""

from __future__ import annotations

import dataclasses

import pytest

from gpu_worker.config import WorkerConfig
from hybridiff import options
from hybridiff.errors import InvalidArgument
from hybridiff_launch.cli import build_parser
from hybridiff_launch.local_cluster import LocalCluster

# A value other than the default for every field (a new field needs one here).
SAMPLES = {
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


def parsed(argv: list[str]) -> WorkerConfig:
    return options.from_args(WorkerConfig, build_parser().parse_args(["worker", *argv]))


def test_every_field_has_a_sample_and_a_flag_in_the_help():
    names = [f.name for f in dataclasses.fields(WorkerConfig)]
    assert sorted(names) == sorted(SAMPLES)
    text = build_parser()._subparsers._group_actions[0].choices["worker"].format_help()
    for f in dataclasses.fields(WorkerConfig):
        assert options.flag_names(f)[0] in text, f.name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_field_round_trips_through_argv(name):
    config = WorkerConfig(**{name: SAMPLES[name]})
    argv = options.to_argv(config)
    assert len(argv) == 2 and parsed(argv) == config


def test_a_config_of_every_field_round_trips_and_the_defaults_give_no_flags():
    config = WorkerConfig(**SAMPLES)
    assert parsed(options.to_argv(config)) == config
    assert options.to_argv(WorkerConfig()) == [] and parsed([]) == WorkerConfig()
    assert parsed(["--model-dir", "m", "--model-name", "n"]) == WorkerConfig(model="m", served_model_name="n")


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("watchdog_seconds", 0.0, "watchdog-seconds"),
        ("session_idle_timeout", float("nan"), "session-idle-timeout"),
        ("data_peer_cidrs", "10.0.0.0/33", "data-peer-cidrs"),
        ("data_max_message_mib", -1, "data-max-message-mib"),
        ("compile", "fast", "compile"),
    ],
)
def test_a_bad_value_in_code_is_refused_as_its_flag_would_be(field, value, flag):
    with pytest.raises(InvalidArgument) as err:
        WorkerConfig(**{field: value})
    assert err.value.field == flag


def test_the_local_cluster_starts_its_workers_with_their_config(tmp_path):
    cluster = LocalCluster(tmp_path, variant="fp16", text_encoder_3=True, compile_mode="none")
    config = dataclasses.replace(cluster.worker_config, cpus="0", device="cpu", worker_id="worker0")
    got = parsed(options.to_argv(config))
    assert got == config and got.model == str(tmp_path) and got.text_encoder_3 and got.compile == "none"
    assert (got.port, got.data_port, got.metrics_port, got.data_peer_cidrs) == (0, 0, 0, "127.0.0.0/8")
