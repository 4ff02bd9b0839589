"""The bind policy (server/transport/exposure.py, posture.py) and the transport flags: an
unauthenticated server stays on loopback unless told otherwise, explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import parse_args
from server.transport import (
    PublicListenRefused,
    TlsSettings,
    TransportSettings,
    check_public_listen,
    default_listen,
    is_loopback,
    resolve_posture,
    security_notice,
    tls_settings,
)


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:50051", "127.8.9.10:1", "localhost:50051", "LOCALHOST:1", "[::1]:50051", "::1", "unix:/tmp/fw.sock", "unix-abstract:fw"],
)
def test_loopback_addresses(listen: str) -> None:
    assert is_loopback(listen)


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:50051", "[::]:50051", ":50051", "10.1.2.3:50051", "192.168.0.5:1", "[2001:db8::1]:50051", "example.com:50051",
     "localhost.example.com:1", "128.0.0.1:1"],
)  # fmt: skip
def test_non_loopback_addresses(listen: str) -> None:
    assert not is_loopback(listen)


def test_public_listen_without_auth_is_refused_with_the_way_out() -> None:
    with pytest.raises(PublicListenRefused) as refused:
        check_public_listen("0.0.0.0:50051", auth_required=False, allowed=False)
    message = str(refused.value)
    assert "0.0.0.0:50051" in message and "--allow-unauthenticated-public" in message and "--auth required" in message


@pytest.mark.parametrize(
    ("listen", "auth_required", "allowed"),
    [("127.0.0.1:50051", False, False), ("0.0.0.0:50051", True, False), ("0.0.0.0:50051", False, True), ("10.0.0.1:1", True, True)],
)
def test_allowed_combinations(listen: str, auth_required: bool, allowed: bool) -> None:
    check_public_listen(listen, auth_required, allowed)  # no exception


def test_default_listen_is_loopback_unless_callers_authenticate() -> None:
    assert default_listen(False) == "127.0.0.1:50051"
    assert default_listen(True) == "0.0.0.0:50051"
    assert is_loopback(default_listen(False)) and not is_loopback(default_listen(True))


def test_posture_resolves_the_default_and_counts_client_certificates_as_authentication(tmp_path: Path) -> None:
    plain = resolve_posture("", TransportSettings(), auth_required=False)
    assert plain.listen == "127.0.0.1:50051" and plain.loopback_only and not plain.auth_required
    info = plain.info()
    assert not info.authentication_required and not info.tls and info.loopback_only and info.listen == "127.0.0.1:50051"

    authenticated = resolve_posture("", TransportSettings(), auth_required=True, auth_mode="required")
    assert authenticated.listen == "0.0.0.0:50051" and authenticated.info().auth_mode == "required"

    mtls = TransportSettings(tls=TlsSettings(cert=tmp_path / "c", key=tmp_path / "k", client_ca=tmp_path / "ca", client_auth="require"))
    posture = resolve_posture("0.0.0.0:6000", mtls, auth_required=False)
    assert posture.auth_required and posture.info().client_certificates_required and posture.info().tls

    with pytest.raises(PublicListenRefused):
        resolve_posture("0.0.0.0:6000", TransportSettings(tls=TlsSettings(cert=tmp_path / "c", key=tmp_path / "k")), auth_required=False)
    allowed = resolve_posture("0.0.0.0:6000", TransportSettings(allow_unauthenticated_public=True), auth_required=False)
    assert not allowed.loopback_only and not allowed.auth_required


def test_notice_is_loud_when_authentication_is_off() -> None:
    loud, text = security_notice("0.0.0.0:50051", auth_required=False, tls="off")
    assert loud and "AUTHENTICATION IS OFF" in text and "reachable from the network" in text
    quiet, text = security_notice("0.0.0.0:50051", auth_required=True, tls="on")
    assert not quiet and "authentication is required" in text


def _pem(path: Path) -> Path:
    path.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    return path


def test_tls_flag_combinations(tmp_path: Path) -> None:
    cert, key, ca = _pem(tmp_path / "c.pem"), _pem(tmp_path / "k.pem"), _pem(tmp_path / "ca.pem")
    assert not tls_settings(None, None, None, None).enabled
    assert tls_settings(cert, key, None, None).client_auth == "none"
    assert tls_settings(cert, key, ca, None).client_auth_required  # a client CA means: require
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        tls_settings(cert, None, None, None)
    with pytest.raises(ValueError, match="optional is not supported"):
        tls_settings(cert, key, ca, "optional")
    with pytest.raises(ValueError, match="needs TLS on the port"):
        tls_settings(None, None, ca, None)
    with pytest.raises(ValueError, match="needs --tls-client-ca"):
        tls_settings(cert, key, None, "require")
    with pytest.raises(ValueError, match="never used"):
        tls_settings(cert, key, ca, "none")
    with pytest.raises(ValueError, match="no such file"):
        tls_settings(tmp_path / "missing.pem", key, None, None)


def test_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "METRICS_LISTEN", "TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA", "TLS_CLIENT_AUTH",
                 "ALLOW_UNAUTHENTICATED_PUBLIC", "TRITON_BIND_ADDRESS"):  # fmt: skip
        monkeypatch.delenv(f"FRAMEWISE_{name}", raising=False)
    defaults = parse_args([])
    assert defaults.listen == "" and defaults.metrics_listen == "127.0.0.1:9091"
    assert defaults.triton_ports.bind_address == "127.0.0.1"
    assert defaults.transport == TransportSettings()

    cert, key, ca = _pem(tmp_path / "c.pem"), _pem(tmp_path / "k.pem"), _pem(tmp_path / "ca.pem")
    monkeypatch.setenv("FRAMEWISE_TLS_CERT", str(cert))
    monkeypatch.setenv("FRAMEWISE_TLS_KEY", str(key))
    monkeypatch.setenv("FRAMEWISE_TLS_CLIENT_CA", str(ca))
    monkeypatch.setenv("FRAMEWISE_ALLOW_UNAUTHENTICATED_PUBLIC", "1")
    monkeypatch.setenv("FRAMEWISE_TRITON_BIND_ADDRESS", "10.0.0.7")
    config = parse_args([])
    assert config.transport.tls == TlsSettings(cert=cert, key=key, client_ca=ca, client_auth="require")
    assert config.transport.allow_unauthenticated_public
    assert config.triton_ports.bind_address == "10.0.0.7"

    with pytest.raises(SystemExit):
        parse_args(["--tls-client-auth", "optional"])
