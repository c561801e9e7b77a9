"""TLS: verified by default, custom CA (file or inline), wrong CA, skipping, client certificates."""

from __future__ import annotations

import ssl

import pytest
from conftest import run_probe, write_config


@pytest.fixture
def https(standin_factory, certificates):
    return standin_factory(certificates.server_context())


@pytest.fixture
def mutual_tls(standin_factory, certificates):
    return standin_factory(certificates.server_context(require_client_certificate=True))


def deliver(tmp_path, client: dict, *args: str):
    return run_probe("maven", "3.9.0", "--config", write_config(tmp_path, client), *args)


def test_verification_is_on_by_default(https, tmp_path):
    result = deliver(tmp_path, {"url": https.url}, "--strict")
    assert result.returncode == 1
    assert "error=tls: certificate verify failed" in result.stderr
    assert https.puts() == []


def test_custom_ca_file_verifies(https, certificates, tmp_path):
    result = deliver(tmp_path, {"url": https.url, "caCertificate": certificates.ca_path})
    assert "delivered status=201" in result.stderr
    assert len(https.documents) == 1


def test_inline_pem_ca_verifies(https, certificates, tmp_path):
    result = deliver(tmp_path, {"url": https.url, "caCertificate": certificates.ca_pem})
    assert "delivered status=201" in result.stderr


def test_wrong_ca_fails_clearly_and_is_not_retried(https, certificates, tmp_path):
    result = deliver(tmp_path, {"url": https.url, "caCertificate": certificates.other_ca_path}, "--strict")
    assert result.returncode == 1
    assert "failed status=- attempts=1" in result.stderr
    assert "tls: certificate verify failed" in result.stderr


def test_hostname_is_checked(standin_factory, certificates, tmp_path):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificates.ca.issue_cert("elsewhere.example").configure_cert(context)  # not 127.0.0.1
    server = standin_factory(context)
    result = deliver(tmp_path, {"url": server.url, "caCertificate": certificates.ca_path})
    assert "tls: certificate verify failed" in result.stderr
    assert "127.0.0.1" in result.stderr.split("error=")[1]  # the mismatch is named


def test_skipping_verification_works_and_warns(https, tmp_path):
    result = deliver(tmp_path, {"url": https.url, "skipSslVerification": True})
    assert "delivered status=201" in result.stderr
    assert "warning: %s: TLS certificate verification is disabled" % https.url in result.stderr


def test_client_certificate_files_give_mutual_tls(mutual_tls, certificates, tmp_path):
    result = deliver(tmp_path, {"url": mutual_tls.url, "caCertificate": certificates.ca_path,
                                "clientCertificate": certificates.client_cert_path,
                                "clientKey": certificates.client_key_path})
    assert "delivered status=201" in result.stderr, result.stderr


def test_inline_client_certificate_and_key(mutual_tls, certificates, tmp_path):
    result = deliver(tmp_path, {"url": mutual_tls.url, "caCertificate": certificates.ca_path,
                                "clientCertificate": open(certificates.client_cert_path).read(),
                                "clientKey": open(certificates.client_key_path).read()})
    assert "delivered status=201" in result.stderr, result.stderr
    assert "PRIVATE KEY" not in result.stderr


def test_without_the_client_certificate_the_server_refuses(mutual_tls, certificates, tmp_path):
    result = deliver(tmp_path, {"url": mutual_tls.url, "caCertificate": certificates.ca_path,
                                "timeout": 2}, "--strict")
    assert result.returncode == 1
    assert "delivered" not in result.stderr


def test_an_unreadable_ca_file_is_a_configuration_error(tmp_path):
    result = deliver(tmp_path, {"url": "https://127.0.0.1:1", "caCertificate": str(tmp_path / "nope.pem")})
    assert result.returncode == 2
    assert "clients[0].caCertificate: cannot load" in result.stderr


def test_plain_http_loads_no_certificates(standin, tmp_path):
    result = deliver(tmp_path, {"url": standin.url, "caCertificate": str(tmp_path / "nope.pem")})
    assert result.returncode == 0 and len(standin.documents) == 1


@pytest.mark.parametrize(("key", "message"), [
    ("caCertificate", "clients[0].caCertificate: cannot load: no such file or directory"),
    ("clientKey", "clients[0].clientKey: cannot load: no such file"),
    ("clientCertificate", "clients[0].clientCertificate: cannot load the client certificate and key"),
])
def test_tls_files_that_do_not_load_are_named_by_their_key(certificates, tmp_path, key, message):
    client = {"url": "https://127.0.0.1:1", "caCertificate": certificates.ca_path,
              "clientCertificate": certificates.client_cert_path,
              "clientKey": certificates.client_key_path}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    client[key] = str(garbage) if key == "clientCertificate" else str(tmp_path / "missing.pem")
    result = deliver(tmp_path, client)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_a_refused_client_certificate_is_logged_as_a_tls_failure(mutual_tls, certificates, tmp_path):
    # With TLS 1.3 the server's refusal arrives after the handshake, outside urllib's URLError.
    result = deliver(tmp_path, {"url": mutual_tls.url, "caCertificate": certificates.ca_path,
                                "timeout": 2})
    assert "tls: " in result.stderr, result.stderr


def test_an_encrypted_client_key_is_refused_without_asking_for_a_passphrase(certificates, tmp_path):
    import os

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certificates.client.private_key_pem.bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    reader, writer = os.pipe()  # a job's stdin, held open: a passphrase prompt would wait on it
    try:
        result = run_probe("maven", "3.9.0", "--config", write_config(tmp_path, {
            "url": "https://127.0.0.1:1", "caCertificate": certificates.ca_path,
            "clientCertificate": certificates.client_cert_path, "clientKey": str(encrypted)}),
            stdin=reader, timeout=20)
    finally:
        os.close(reader)
        os.close(writer)
    assert result.returncode == 2
    assert "clients[0].clientKey: an encrypted key is not supported" in result.stderr, result.stderr
