"""The client warns when a bearer token would travel over plaintext to another host."""

from __future__ import annotations

import warnings

import pytest

from hybridiff.client import AsyncDiffusionClient, DiffusionClient, PlaintextTokenWarning, is_loopback


@pytest.mark.parametrize(
    "target,local",
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:50051", True),
        ("localhost:50051", True),
        ("LOCALHOST", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("dns:///localhost:50051", True),
        ("dns://8.8.8.8/localhost:50051", True),
        ("ipv4:127.0.0.1:50051", True),
        ("unix:/run/hybridiff.sock", True),
        ("10.0.0.7:50051", False),
        ("hybridiff.serving.svc:50051", False),
        ("[2001:db8::1]:50051", False),
        ("dns:///hybridiff.example.com:443", False),
        ("localhost.example.com:50051", False),
    ],
)
def test_loopback_targets(target, local):
    assert is_loopback(target) is local


def _warnings(make) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = make()
        client.channel.close()
    return [w for w in caught if issubclass(w.category, PlaintextTokenWarning)]


def test_a_token_over_plaintext_to_another_host_warns_once_per_client():
    caught = _warnings(lambda: DiffusionClient("10.0.0.7:50051", token="s3cret"))
    assert len(caught) == 1
    assert "10.0.0.7:50051" in str(caught[0].message) and "s3cret" not in str(caught[0].message)
    assert caught[0].filename == __file__, "the warning points at the caller's line"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": "127.0.0.1:50051", "token": "s3cret"},  # loopback
        {"target": "10.0.0.7:50051"},  # no token
    ],
)
def test_no_warning_without_a_token_or_on_loopback(kwargs):
    assert not _warnings(lambda: DiffusionClient(**kwargs))


def test_no_warning_over_tls(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")  # read, never used
    assert not _warnings(lambda: DiffusionClient("10.0.0.7:50051", token="s3cret", tls_ca=str(ca)))


def test_the_async_client_warns_too():
    import asyncio

    async def make():
        client = AsyncDiffusionClient("10.0.0.7:50051", token="s3cret")
        await client.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(make())
    assert [w for w in caught if issubclass(w.category, PlaintextTokenWarning)]


def test_the_cli_warns(tmp_path, capsys):
    from hybridiff_launch.cli import main

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args = [
        "models",
        "--target",
        "10.255.255.1:9",
        "--auth-token-file",
        str(token),
        "--connect-timeout",
        "0.1",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) != 0  # unreachable
    assert [w for w in caught if issubclass(w.category, PlaintextTokenWarning)]
