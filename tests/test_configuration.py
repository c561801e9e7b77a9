"""Configuration: sources, validation by JSON path, ${NAME} substitution, warnings."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ROOT, SECRET, TRACKING, probe_env, run_probe, write_config

import tracking


def load(config: object, environ: dict | None = None, warnings: list | None = None):
    return tracking.load_configuration(json.dumps(config), environ or {}, "test",
                                       (warnings if warnings is not None else []).append)


def one(client: dict, **environ: str) -> tracking.Client:
    return load({"clients": [client]}, environ)[0]


@pytest.mark.parametrize(("config", "message"), [
    ([], "test: expected a JSON object, got an array"),
    ({}, 'clients: missing (expected an array of servers)'),
    ({"clients": {}}, "clients: expected an array, got an object"),
    ({"clients": ["http://x"]}, 'clients[0]: expected an object, got "http://x"'),
    ({"clients": [{}]}, 'clients[0]: expected exactly one of "url" or "urls"'),
    ({"clients": [{"url": "http://a", "urls": ["http://b"]}]}, 'clients[0]: expected exactly one'),
    ({"clients": [{"url": 9200}]}, "clients[0].url: expected a string, got a number"),
    ({"clients": [{"urls": []}]}, "clients[0].urls: expected at least one URL"),
    ({"clients": [{"urls": ["http://a", 5]}]}, "clients[0].urls[1]: expected a string, got a number"),
    ({"clients": [{"url": "ftp://host"}]}, "clients[0].url: expected an http:// or https:// URL"),
    ({"clients": [{"url": "https://"}]}, "clients[0].url: expected an http:// or https:// URL"),
    ({"clients": [{"url": "http://h:99999"}]}, "clients[0].url: not a valid URL"),
    ({"clients": [{"url": "http://h/?x=1"}]}, "clients[0].url: a server URL takes no query"),
    ({"clients": [{"url": "http://h", "timeout": "5s"}]},
     'clients[0].timeout: expected a number, got "5s"'),
    ({"clients": [{"url": "http://h"}, {"url": "http://h", "timeout": "5s"}]},
     'clients[1].timeout: expected a number, got "5s"'),
    ({"clients": [{"url": "http://h", "timeout": 0}]}, "clients[0].timeout: expected a number of seconds"),
    ({"clients": [{"url": "http://h", "timeout": True}]}, "clients[0].timeout: expected a number, got true"),
    ({"clients": [{"url": "http://h", "indexPrefix": 3}]}, "clients[0].indexPrefix: expected a string"),
    ({"clients": [{"url": "http://h", "indexPrefix": "TBC-"}]},
     "clients[0].indexPrefix: an index name must be lowercase"),
    ({"clients": [{"url": "http://h", "index": "a/b"}]},
     'clients[0].index: an index name cannot contain "/"'),
    ({"clients": [{"url": "http://h", "index": "x-{week}"}]}, "clients[0].index: unknown placeholder"),
    ({"clients": [{"url": "http://h", "esMajorVersion": 4}]}, "clients[0].esMajorVersion: expected one of"),
    ({"clients": [{"url": "http://h", "esMajorVersion": "7"}]},
     'clients[0].esMajorVersion: expected an integer, got "7"'),
    ({"clients": [{"url": "http://h", "skipSslVerification": "yes"}]},
     'clients[0].skipSslVerification: expected true or false, got "yes"'),
    ({"clients": [{"url": "http://h", "authentication": "x"}]},
     "clients[0].authentication: expected an object, got a string"),
    ({"clients": [{"url": "http://h", "authentication": {"password": "p"}}]},
     'clients[0].authentication: expected {"username", "password"}, {"apiKey"} or {"bearerToken"}'),
    ({"clients": [{"url": "http://h", "authentication": {"user": "u"}}]},
     'clients[0].authentication: expected {"username", "password"}, {"apiKey"} or {"bearerToken"}'),
    ({"clients": [{"url": "http://h", "authentication": {"apiKey": "clé✓"}}]},
     "clients[0].authentication.apiKey: must be printable ASCII without spaces"),
    ({"clients": [{"url": "http://h", "authentication": {"bearerToken": "a b"}}]},
     "clients[0].authentication.bearerToken: must be printable ASCII without spaces"),
    ({"clients": [{"url": "http://h", "authentication": {"username": "u", "password": 123456}}]},
     "clients[0].authentication.password: expected a string"),
    ({"clients": [{"url": "http://h", "clientCertificate": "c.pem"}]},
     'clients[0]: "clientCertificate" and "clientKey" go together'),
    ({"clients": [{"url": "http://h", "proxy": "proxy:3128"}]}, "clients[0].proxy: expected an http://"),
    ({"clients": [{"url": "http://h", "proxy": "https://proxy:3128"}]},
     "clients[0].proxy: expected http://[user:password@]host[:port]"),
    ({"clients": [{"url": "http://h", "proxy": "http://proxy:3128/path"}]},
     "clients[0].proxy: expected http://[user:password@]host[:port]"),
    ({"clients": [{"url": "http://h/my index"}]}, "clients[0].url: a URL cannot contain spaces"),
    ({"clients": [{"urls": ["http://h", "http://h\t2"]}]}, "clients[0].urls[1]: a URL cannot contain spaces"),
    ({"clients": [{"url": "http://h", "timeout": 7200}]},
     "clients[0].timeout: expected a number of seconds above 0 and at most 3600, got 7200"),
    ({"clients": [{"url": "http://h", "caCertificate": ["x"]}]},
     "clients[0].caCertificate: expected a string, got an array"),
    ({"clients": [{"url": "http://h", "index": "${NOPE}"}]},
     "clients[0].index: environment variable NOPE is not set"),
    ({"clients": [{"url": "http://h", "index": "${bad name}"}]},
     "clients[0].index: malformed variable reference"),
])
def test_every_configuration_error_names_its_json_path(config, message):
    with pytest.raises(tracking.ConfigError) as error:
        load(config)
    assert str(error.value).startswith(message), str(error.value)


def test_a_wrongly_typed_password_is_not_echoed():
    with pytest.raises(tracking.ConfigError) as error:
        load({"clients": [{"url": "http://h", "authentication": {"username": "u", "password": 987654}}]})
    assert "987654" not in str(error.value)


def test_invalid_json_gives_position_not_content():
    with pytest.raises(tracking.ConfigError) as error:
        tracking.load_configuration('{"clients": [{"url": "x", "password": "%s"' % SECRET, {}, "f")
    assert "invalid JSON" in str(error.value) and "line 1" in str(error.value)
    assert SECRET not in str(error.value)


def test_defaults():
    client = one({"url": "https://es.example.com:9200/"})
    assert client.urls == ["https://es.example.com:9200"]
    assert client.timeout == 5
    assert client.es_major_version == 7
    assert client.index_pattern == "ci-job-{YYYY}.{MM}"
    assert client.skip_ssl_verification is False
    assert client.authorization is None


def test_original_configuration_is_accepted_as_is():
    original = {"clients": [{"url": "https://elasticsearch-host",
                             "authentication": {"username": "tbc-tracking", "password": "mYp@55w0rd"},
                             "timeout": 5, "indexPrefix": "tbc-", "esMajorVersion": 7,
                             "skipSslVerification": True}]}
    warnings: list[str] = []
    [client] = load(original, warnings=warnings)
    assert warnings == []
    assert client.index_pattern == "tbc-ci-job-{YYYY}.{MM}"
    assert client.skip_ssl_verification is True


def test_unknown_keys_are_warned_by_name():
    warnings: list[str] = []
    load({"clients": [{"url": "http://h", "tiemout": 5}], "extra": 1}, warnings=warnings)
    assert any("clients[0].tiemout: unknown key" in w for w in warnings)
    assert any("extra: unknown key" in w for w in warnings)


def test_variables_are_substituted_in_every_string():
    client = one({"urls": ["https://${HOST}:9200"], "indexPrefix": "${PREFIX}",
                  "authentication": {"username": "u", "password": "${PASSWORD}"}},
                 HOST="es.internal", PREFIX="team-", PASSWORD="p$w")
    assert client.urls == ["https://es.internal:9200"]
    assert client.index_pattern.startswith("team-")
    assert client.authorization == tracking.basic_authorization("u", "p$w")


@pytest.mark.parametrize(("text", "expected"), [
    ("a$$b", "a$b"), ("$$${X}", "$x"), ("cost $5", "cost $5"), ("end$", "end$"), ("${X}${X}", "xx"),
])
def test_dollar_escapes(text, expected):
    assert tracking.expand_variables(text, {"X": "x"}, "p") == expected


def test_credentials_in_the_url_become_basic_auth_and_leave_the_url():
    client = one({"url": "https://user:p%40ss@es.example.com:9200"})
    assert client.urls == ["https://es.example.com:9200"]
    assert client.authorization == tracking.basic_authorization("user", "p@ss")
    assert "p@ss" in client.secrets


# ------------------------------------------------------------------ where the configuration comes from


def test_config_option_reads_a_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"clients": [{"url": "http://from-file:9200"}]}))
    result = run_probe("--dry-run", "--config", str(path), "maven", "1.0")
    assert json.loads(result.stdout)["requests"][0]["server"] == "http://from-file:9200"


def test_tracking_configuration_may_hold_inline_json():
    env = probe_env(TRACKING_CONFIGURATION=json.dumps({"clients": [{"url": "http://inline:9200"}]}))
    result = run_probe("--dry-run", "maven", "1.0", env=env)
    assert json.loads(result.stdout)["requests"][0]["server"] == "http://inline:9200"


def test_tracking_configuration_may_hold_a_path_like_a_gitlab_file_variable(tmp_path):
    path = tmp_path / "TRACKING_CONFIGURATION"
    path.write_text(json.dumps({"clients": [{"url": "http://file-variable:9200"}]}))
    result = run_probe("--dry-run", "maven", "1.0", env=probe_env(TRACKING_CONFIGURATION=str(path)))
    assert json.loads(result.stdout)["requests"][0]["server"] == "http://file-variable:9200"


def test_config_option_wins_over_the_variable(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"clients": [{"url": "http://option:9200"}]}))
    env = probe_env(TRACKING_CONFIGURATION=json.dumps({"clients": [{"url": "http://inline:9200"}]}))
    result = run_probe("--dry-run", "--config", str(path), "maven", "1.0", env=env)
    assert json.loads(result.stdout)["requests"][0]["server"] == "http://option:9200"


def test_config_json_beside_the_script_is_the_last_resort(tmp_path):
    shutil.copy(TRACKING, tmp_path / "tracking.py")
    (tmp_path / "config.json").write_text(json.dumps({"clients": [{"url": "http://beside:9200"}]}))
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(tmp_path / "tracking.py"), "--dry-run", "m", "1"],
                            env=probe_env(), capture_output=True, text=True, timeout=30, check=False)
    assert json.loads(result.stdout)["requests"][0]["server"] == "http://beside:9200"


def test_missing_configuration_file_is_a_configuration_error(tmp_path):
    result = run_probe("maven", "1.0", env=probe_env(TRACKING_CONFIGURATION=str(tmp_path / "absent.json")))
    assert result.returncode == 2
    assert "TRACKING_CONFIGURATION" in result.stderr and "cannot read" in result.stderr


def test_configuration_error_exits_2_with_the_json_path(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"clients": [{"url": "http://a"}, {"url": "http://b", "timeout": "5s"}]}))
    result = run_probe("maven", "1.0", "--config", str(path))
    assert result.returncode == 2
    assert 'clients[1].timeout: expected a number, got "5s"' in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_warning_reaches_stderr(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"clients": [{"url": "http://a", "idnexPrefix": "x-"}]}))
    result = run_probe("--dry-run", "maven", "1.0", "--config", str(path))
    assert result.returncode == 0
    assert "clients[0].idnexPrefix: unknown key" in result.stderr


def test_example_configuration_is_valid_and_complete():
    result = run_probe("--dry-run", "--config", str(ROOT / "config.example.json"), "maven", "3.9.0")
    assert result.returncode == 0, result.stderr
    assert "unknown key" not in result.stderr
    keys, authentication = set(), set()
    for client in json.loads((ROOT / "config.example.json").read_text())["clients"]:
        keys |= set(client)
        authentication |= set(client.get("authentication", {}))
    assert keys == set(tracking.CLIENT_KEYS)
    assert authentication == set(tracking.AUTHENTICATION_KEYS)


@pytest.mark.parametrize("authentication", [{"username": "", "password": ""}, {"apiKey": ""},
                                            {"bearerToken": ""}])
def test_an_empty_credential_means_no_authentication(authentication):
    assert one({"url": "http://h", "authentication": authentication}).authorization is None


def test_unknown_authentication_keys_are_warned_not_fatal():
    warnings: list[str] = []
    [client] = load({"clients": [{"url": "http://h", "authentication": {
        "username": "u", "password": "p", "realm": "x"}}]}, warnings=warnings)
    assert client.authorization == tracking.basic_authorization("u", "p")
    assert any("clients[0].authentication.realm: unknown key" in w for w in warnings)


@pytest.mark.parametrize("client", [
    {"url": "http://h", "authentication": "tbc:%s" % SECRET},
    {"urls": "http://u:%s@h:9200" % SECRET},
    {"url": "http://h", "clientCertificate": "c.pem", "clientKey": ["%s" % SECRET]},
])
def test_error_messages_never_echo_a_secret(client):
    with pytest.raises(tracking.ConfigError) as error:
        load({"clients": [client]})
    assert SECRET not in str(error.value)


def test_a_tracking_configuration_that_is_neither_json_nor_a_file_is_not_echoed():
    env = probe_env(TRACKING_CONFIGURATION='"clients": [{"url": "http://u:%s@h"}]' % SECRET)
    result = run_probe("maven", "1", env=env)
    assert result.returncode == 2
    assert "TRACKING_CONFIGURATION" in result.stderr and "cannot read" in result.stderr


def test_a_configuration_that_is_not_utf8_is_a_configuration_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes('{"clients": [{"url": "http://h", "indexPrefix": "été-"}]}'.encode("latin-1"))
    result = run_probe("maven", "1", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and "UTF-8" in result.stderr


def test_a_configuration_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"clients": [{"url": "http://h", "indexPrefix": "bom-"}]}')
    result = run_probe("--dry-run", "maven", "1", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["requests"][0]["index"].startswith("bom-ci-job-")


def test_absurdly_nested_json_is_a_configuration_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[" * 100000 + "]" * 100000)
    result = run_probe("maven", "1", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "nested too deeply" in result.stderr


def test_an_unknown_key_is_not_expanded_so_its_unset_variable_is_no_error(tmp_path):
    config = write_config(tmp_path, {"url": "http://es:9200", "comment": "set ${NOT_SET_ANYWHERE}"})
    result = run_probe("--dry-run", "maven", "1", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "clients[0].comment: unknown key" in result.stderr


def test_index_prefix_beside_index_is_warned_about(tmp_path):
    config = write_config(tmp_path, {"url": "http://es:9200", "index": "stats-{YYYY}", "indexPrefix": "tbc-"})
    result = run_probe("--dry-run", "maven", "1", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "clients[0].indexPrefix: ignored, clients[0].index names the whole index" in result.stderr
    assert json.loads(result.stdout)["requests"][0]["index"].startswith("stats-")
