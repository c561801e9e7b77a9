"""Secrets never appear in any output, in any mode.

The autouse fixture in conftest.py checks every captured output of every test for the
sentinel password (and its Basic form); these tests aim the probe at the risky paths."""

from __future__ import annotations

import base64

import pytest
from conftest import SECRET, SECRET_FORMS, probe_env, run_probe, unused_port, write_config

import tracking

AUTHENTICATIONS = [
    {"username": "tracking", "password": SECRET},
    {"apiKey": SECRET},
    {"bearerToken": SECRET},
]


def assert_clean(*texts: str) -> None:
    for text in texts:
        for form in (*SECRET_FORMS, base64.b64encode(SECRET.encode()).decode()):
            assert form not in text


@pytest.mark.parametrize("authentication", AUTHENTICATIONS)
@pytest.mark.parametrize("mode", [("--dry-run",), ("-v",), ("-v", "--strict"), ("--check",)])
def test_no_mode_prints_a_credential(standin, tmp_path, authentication, mode):
    standin.respond_with(401)
    config = write_config(tmp_path, {"url": standin.url, "authentication": authentication})
    args = ("--config", config) + mode + (() if "--check" in mode else ("maven", "1"))
    result = run_probe(*args)
    assert result.returncode in (0, 1)
    assert_clean(result.stdout, result.stderr)
    assert result.stdout or result.stderr


def test_credentials_inside_urls_are_masked_everywhere(standin, tmp_path):
    url = standin.url.replace("http://", "http://tracking:%s@" % SECRET)
    dead = "http://tracking:%s@127.0.0.1:%d" % (SECRET, unused_port())
    config = write_config(tmp_path, {"urls": [dead, url], "timeout": 2})
    for args in (("--dry-run", "m", "1"), ("-v", "m", "1"), ("--check",)):
        result = run_probe("--config", config, *args)
        assert_clean(result.stdout, result.stderr)
    assert standin.puts()[0].headers["Authorization"] == tracking.basic_authorization("tracking", SECRET)


def test_a_server_echoing_the_secret_is_masked(standin, tmp_path):
    standin.respond_with((403, {"error": {"type": "security_exception",
                                          "reason": "bad credentials [%s]" % SECRET}}, {}))
    config = write_config(tmp_path, {"url": standin.url, "authentication": {"apiKey": SECRET}})
    result = run_probe("maven", "1", "--config", config)
    assert "security_exception: bad credentials [***]" in result.stderr


def test_configuration_errors_do_not_echo_secrets(tmp_path):
    for client in ({"url": "http://u:%s@h:99999" % SECRET},
                   {"url": "http://h", "authentication": {"username": "u", "password": [SECRET]}},
                   {"url": "http://h", "authentication": {"apiKey": SECRET, "username": "u"}},
                   {"url": "http://h", "authentication": {"apiKey": SECRET + "\n"}}):
        result = run_probe("maven", "1", "--config", write_config(tmp_path, client))
        assert result.returncode == 2, result.stderr
        assert "configuration error: clients[0]" in result.stderr
        assert_clean(result.stderr)


def test_secrets_from_environment_variables_are_masked_too(standin, tmp_path):
    standin.respond_with((401, {"error": {"type": "security_exception", "reason": "x %s" % SECRET}}, {}))
    config = write_config(tmp_path, {"url": standin.url,
                                     "authentication": {"username": "u", "password": "${ES_PASSWORD}"}})
    result = run_probe("maven", "1", "--config", config, "-v", env=probe_env(ES_PASSWORD=SECRET))
    assert "failed status=401" in result.stderr
    assert_clean(result.stderr)


def test_redact_masks_userinfo_and_known_secrets():
    text = "https://user:pw@host:9200/x and again %s" % SECRET
    assert tracking.redact(text, [SECRET]) == "https://***@host:9200/x and again ***"


@pytest.mark.parametrize("userinfo", ["proxyuser:%s" % SECRET, ":%s" % SECRET])
def test_a_proxy_password_is_a_secret_even_without_a_user_name(userinfo):
    text = '{"clients": [{"url": "http://h", "proxy": "http://%s@proxy:3128"}]}' % userinfo
    [client] = tracking.load_configuration(text, {}, "test", lambda _: None)
    assert SECRET in client.secrets
    assert "proxyuser" not in client.secrets


@pytest.mark.parametrize("password", ["p@ss-%s" % SECRET, "%s@x" % SECRET])
def test_a_proxy_password_holding_an_at_sign_is_masked(standin, tmp_path, password):
    config = write_config(tmp_path, {"url": standin.url, "proxy": "http://u:%s@127.0.0.1:1" % password})
    result = run_probe("--dry-run", "maven", "1", "--config", config)
    assert result.returncode == 0, result.stderr
    assert '"proxy": "http://***@127.0.0.1:1"' in result.stdout
    assert_clean(result.stdout, result.stderr)
    assert "p@ss" not in result.stdout


def test_a_url_broken_by_an_unencoded_slash_in_its_password_is_refused_without_echo(tmp_path):
    for client in ({"url": "http://u:pass/%s@h" % SECRET},
                   {"url": "http://h", "proxy": "http://u:pass/%s@127.0.0.1:1" % SECRET}):
        result = run_probe("--dry-run", "maven", "1", "--config", write_config(tmp_path, client))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "configuration error: clients[0]." in result.stderr
        assert_clean(result.stdout, result.stderr)


def test_inline_json_given_to_config_is_refused_without_echo():
    inline = '{"clients": [{"url": "http://tracking:%s@h"}]}' % SECRET
    for args in (("--config", inline), ("--config=" + inline,)):
        result = run_probe(*args, "maven", "1")
        assert result.returncode == 2
        assert "--config takes a file path" in result.stderr
        assert_clean(result.stdout, result.stderr)


@pytest.mark.parametrize(("key", "value"), [("timeout", "${ES_PASSWORD}"),
                                            ("esMajorVersion", "${ES_PASSWORD}"),
                                            ("indexPrefix", "${ES_PASSWORD}/")])
def test_errors_about_a_value_taken_from_a_variable_do_not_echo_it(tmp_path, key, value):
    config = write_config(tmp_path, {"url": "http://h", key: value})
    result = run_probe("--dry-run", "maven", "1", "--config", config, env=probe_env(ES_PASSWORD=SECRET))
    assert result.returncode == 2
    assert "configuration error: clients[0].%s" % key in result.stderr
    assert_clean(result.stdout, result.stderr)
