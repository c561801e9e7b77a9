"""What goes on the wire: index names, paths, ids, headers, authentication."""

from __future__ import annotations

import base64
import json
import time

import pytest
from conftest import SECRET, basic_auth, probe_env, run_probe, write_config

import tracking

DECEMBER = time.gmtime(1796284800)  # 2026-12-03 UTC


@pytest.mark.parametrize(("pattern", "expected"), [
    ("tbc-ci-job-{YYYY}.{MM}", "tbc-ci-job-2026.12"),
    ("ci-{YYYY}.{MM}.{DD}", "ci-2026.12.03"),
    ("tracking", "tracking"),
])
def test_index_date_placeholders_use_the_utc_month(pattern, expected):
    assert tracking.expand_index(pattern, DECEMBER) == expected


@pytest.mark.parametrize("name", [
    "UPPER", "a b", "a/b", "a\\b", "a*b", "a?b", 'a"b', "a<b", "a>b", "a|b", "a,b", "a#b", "a:b",
    "-a", "_a", "+a", ".", "..", "", "x" * 256, "é" * 128, "a\nb", "a{b}",
])
def test_invalid_index_names_are_refused(name):
    assert tracking.index_name_problem(name)


@pytest.mark.parametrize("name", ["tbc-ci-job-2026.12", "a", "x" * 255, "été-2026", ".hidden-ok"])
def test_valid_index_names_pass(name):
    assert tracking.index_name_problem(name) is None


@pytest.mark.parametrize("prefix", ["../", "a/../../_cluster/settings?x=", "x#", "x?pretty", "x%2f"])
def test_a_prefix_can_never_change_the_request_path(prefix, tmp_path):
    config = write_config(tmp_path, {"url": "http://es:9200", "indexPrefix": prefix})
    result = run_probe("--dry-run", "--config", config, "maven", "1")
    if result.returncode == 0:  # accepted: then it is one percent-encoded path segment
        url = json.loads(result.stdout)["requests"][0]["url"]
        path = url[len("http://es:9200"):]
        assert path.count("/") == 3 and "?" not in path and "#" not in path and ".." not in path
    else:
        assert result.returncode == 2 and "clients[0].indexPrefix" in result.stderr


def test_the_index_segment_is_percent_encoded():
    assert tracking.request_path("été", "abc", 8) == "/%C3%A9t%C3%A9/_create/abc"


@pytest.mark.parametrize(("version", "path"), [
    (9, "/idx/_create/ID"), (8, "/idx/_create/ID"), (7, "/idx/_create/ID"),
    (3, "/idx/_create/ID"), (2, "/idx/_create/ID"), (1, "/idx/_create/ID"),
    (6, "/idx/_doc/ID/_create"), (5, "/idx/doc/ID/_create"),
])
def test_create_path_per_server_version(version, path):
    assert tracking.request_path("idx", "ID", version) == path


@pytest.mark.parametrize(("authentication", "expected"), [
    ({"username": "tracking", "password": "pw"}, "Basic " + base64.b64encode(b"tracking:pw").decode()),
    ({"username": "tr@ck", "password": "pä:ss"},
     "Basic " + base64.b64encode("tr@ck:pä:ss".encode()).decode()),
    ({"apiKey": "VnVhQ2ZH=="}, "ApiKey VnVhQ2ZH=="),
    ({"bearerToken": "eyJhbGci"}, "Bearer eyJhbGci"),
])
def test_each_authentication_kind_gives_its_header(authentication, expected):
    assert tracking.authorization_header(authentication, "a") == expected


def test_headers_on_the_wire(standin, tmp_path):
    config = write_config(tmp_path, {"url": standin.url, "authentication": basic_auth(),
                                     "esMajorVersion": 8, "indexPrefix": "tbc-"})
    result = run_probe("maven", "3.9.0", "--config", config)
    assert result.returncode == 0, result.stderr
    [request] = standin.puts()
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert headers["user-agent"].startswith("tracking-probe/%s" % tracking.__version__)
    assert headers["authorization"] == tracking.basic_authorization("tracking", SECRET)
    assert "compatible-with" not in json.dumps(headers)
    index = time.strftime("tbc-ci-job-%Y.%m", time.gmtime())
    assert request.path.startswith("/%s/_create/" % index)


@pytest.mark.parametrize(("authentication", "header"), [
    ({"apiKey": "a2V5aWQ6c2VjcmV0"}, "ApiKey a2V5aWQ6c2VjcmV0"),
    ({"bearerToken": "tok.en.value"}, "Bearer tok.en.value"),
])
def test_api_key_and_bearer_reach_the_server(standin, tmp_path, authentication, header):
    config = write_config(tmp_path, {"url": standin.url, "authentication": authentication})
    assert run_probe("maven", "3.9.0", "--config", config).returncode == 0
    assert standin.puts()[0].headers["Authorization"] == header


def test_body_is_the_document_in_utf8(standin, tmp_path):
    config = write_config(tmp_path, {"url": standin.url})
    env = probe_env(CI_JOB_NAME="déploiement ✓")
    assert run_probe("maven", "3.9.0", "--config", config, env=env).returncode == 0
    body = standin.puts()[0].body
    assert "déploiement ✓".encode() in body
    document = json.loads(body)
    assert document["@type"] == "ci-job" and document["ci"]["job"]["id"] == 8585338


def test_dry_run_shows_the_exact_request(tmp_path):
    config = write_config(tmp_path, {"url": "https://es.example.com", "authentication": basic_auth(),
                                     "indexPrefix": "tbc-", "esMajorVersion": 6})
    result = run_probe("--dry-run", "maven", "3.9.0", "--config", config)
    plan = json.loads(result.stdout)
    [request] = plan["requests"]
    identifier = tracking.document_id(probe_env(), "maven", b"")
    index = time.strftime("tbc-ci-job-%Y.%m", time.gmtime())
    assert request["method"] == "PUT"
    assert request["url"] == "https://es.example.com/%s/_doc/%s/_create" % (index, identifier)
    assert request["index"] == index and request["documentId"] == identifier
    assert request["headers"]["Authorization"] == "Basic ***"
    assert plan["document"]["template"] == {"name": "maven", "version": "3.9.0"}
