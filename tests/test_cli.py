"""The command line: --dry-run, --check, --version, --help, -q, -v, TRACKING_DISABLED, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import TRACKING, Trickle, basic_auth, probe_env, run_probe, unused_port, write_config

import tracking

# Run the probe under an audit hook that makes any socket connection fatal.
NO_NETWORK = (
    "import runpy, sys\n"
    "def hook(event, args):\n"
    "    if event in ('socket.connect', 'socket.getaddrinfo', 'socket.bind'):\n"
    "        sys.stderr.write('network used: %s\\n' % event)\n"
    "        raise SystemExit(3)\n"
    "sys.addaudithook(hook)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def test_dry_run_on_a_fresh_clone_prints_the_document():
    result = run_probe("--dry-run", "maven", "3.9.0")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["@type"] == "ci-job"
    assert plan["template"] == {"name": "maven", "version": "3.9.0"}


def test_dry_run_opens_no_connection(standin, tmp_path):
    config = write_config(tmp_path, {"url": standin.url, "authentication": basic_auth()},
                          {"url": "https://es.example.com"})
    result = subprocess.run([sys.executable, "-c", NO_NETWORK, TRACKING, "--dry-run", "maven", "1",
                             "--config", config], env=probe_env(), capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["requests"]) == 2
    assert standin.requests == []


def test_the_audit_hook_does_catch_a_real_run(standin, tmp_path):
    """Proves the no-network harness above can fail."""
    config = write_config(tmp_path, {"url": standin.url, "timeout": 1})
    result = subprocess.run([sys.executable, "-c", NO_NETWORK, TRACKING, "maven", "1", "--config", config],
                            env=probe_env(), capture_output=True, text=True, timeout=30, check=False)
    assert "network used: socket." in result.stderr
    assert standin.requests == []


def test_version():
    result = run_probe("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "tracking.py %s" % tracking.__version__


def test_help_lists_every_option_and_the_exit_codes():
    result = run_probe("--help")
    assert result.returncode == 0
    for option in ("--service", "--config", "--dry-run", "--check", "--strict", "--quiet",
                   "--verbose", "--version", "TRACKING_CONFIGURATION", "Exit codes"):
        assert option in result.stdout


@pytest.mark.parametrize("args", [("--bogus",), ("maven",), ("a", "b", "c"), ("--check", "--dry-run"),
                                  ("", "1.0"), ("maven", " "), ("--dry-run",), ("--config",),
                                  ("--config", "--dry-run", "maven", "1")])
def test_usage_errors_exit_2(args):
    result = run_probe(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("tracking: usage error: ")
    assert "usage: python tracking.py" in result.stderr


def test_no_configuration_sends_nothing_and_exits_0():
    result = run_probe("maven", "1")
    assert result.returncode == 0
    assert "no server configured" in result.stderr


@pytest.mark.parametrize("value", ["1", "true", "yes", "TRUE", "Yes"])
def test_tracking_disabled_sends_nothing(standin, tmp_path, value):
    config = write_config(tmp_path, {"url": standin.url})
    result = run_probe("maven", "1", "--config", config, "--strict",
                       env=probe_env(TRACKING_DISABLED=value))
    assert result.returncode == 0
    assert standin.requests == []
    assert "disabled" in result.stderr


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_tracking_disabled_false_values_still_send(standin, tmp_path, value):
    config = write_config(tmp_path, {"url": standin.url})
    run_probe("maven", "1", "--config", config, env=probe_env(TRACKING_DISABLED=value))
    assert len(standin.documents) == 1


def test_quiet_hides_success_but_not_failure(standin, tmp_path):
    dead = "http://127.0.0.1:%d" % unused_port()
    config = write_config(tmp_path, {"url": standin.url}, {"url": dead, "timeout": 0.5})
    result = run_probe("maven", "1", "--config", config, "-q")
    assert "delivered" not in result.stderr
    assert "failed" in result.stderr and dead in result.stderr


def test_quiet_still_shows_warnings(standin, tmp_path):
    config = write_config(tmp_path, {"url": standin.url, "tiemout": 5},
                          {"url": "https://127.0.0.1:%d" % unused_port(), "skipSslVerification": True,
                           "timeout": 0.5})
    result = run_probe("maven", "1", "--config", config, "-q")
    assert "clients[0].tiemout: unknown key" in result.stderr
    assert "TLS certificate verification is disabled" in result.stderr
    assert "delivered" not in result.stderr
    assert len(standin.documents) == 1


def test_dry_run_with_a_configuration_shows_the_document_and_each_request(tmp_path):
    config = write_config(tmp_path, {"url": "http://es:9200"})
    plan = json.loads(run_probe("--dry-run", "maven", "1", "--config", config).stdout)
    assert plan["document"]["@type"] == "ci-job"
    assert [request["server"] for request in plan["requests"]] == ["http://es:9200"]


def test_verbose_logs_each_attempt(standin, tmp_path):
    standin.respond_with(503)
    config = write_config(tmp_path, {"url": standin.url})
    result = run_probe("maven", "1", "--config", config, "-v")
    assert "attempt 1: status=503" in result.stderr
    assert "attempt 2: status=201" in result.stderr


# ------------------------------------------------------------------ --check


def check(tmp_path, *clients: dict):
    return run_probe("--check", "--config", write_config(tmp_path, *clients))


def test_check_reports_flavour_version_and_write_privilege(standin, tmp_path):
    result = check(tmp_path, {"url": standin.url, "authentication": basic_auth(), "indexPrefix": "tbc-"})
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip()
    assert line.startswith("ok")
    assert "elasticsearch 8.15.0" in line and "can write" in line and "tbc-ci-job-" in line
    assert standin.puts() == []  # nothing indexed
    [query] = [r for r in standin.requests if "_has_privileges" in r.path]
    assert query.json()["index"][0]["privileges"] == ["create_doc", "indices:admin/auto_create"]


def test_check_reports_missing_write_privilege(standin, tmp_path):
    standin.granted = {"create_doc": False, "indices:admin/auto_create": True}
    result = check(tmp_path, {"url": standin.url, "authentication": basic_auth()})
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL") and "cannot write" in result.stdout


def test_check_says_when_the_index_cannot_be_created(standin, tmp_path):
    standin.granted = {"create_doc": True}
    result = check(tmp_path, {"url": standin.url, "authentication": basic_auth()})
    assert result.returncode == 0
    assert "can write (to an existing index only" in result.stdout


@pytest.mark.parametrize("status", [403, 405])
def test_check_goes_on_when_the_root_is_forbidden_or_absent(standin, tmp_path, status):
    standin.respond_with((status, {"error": {"type": "security_exception", "reason": "no"}},
                          {"X-Elastic-Product": "Elasticsearch"}))
    standin.root = None
    result = check(tmp_path, {"url": standin.url, "authentication": basic_auth()})
    assert result.returncode == 0, result.stdout
    assert "elasticsearch version unknown" in result.stdout and "can write" in result.stdout


@pytest.mark.parametrize(("flavour", "version", "configured", "problem"), [
    ("elasticsearch", "8.15.0", 6, "set 8"),
    ("elasticsearch", "9.2.4", 5, "set 9"),
    ("opensearch", "2.19.1", 6, "set 2"),
    ("elasticsearch", "6.8.23", 7, "set 6"),
    ("elasticsearch", "5.6.16", 6, "set 5"),
    ("elasticsearch", "8.15.0", 7, None),  # the same requests as 8
    ("elasticsearch", "7.17.29", 6, None),  # typed URLs still work on 7 (deprecated)
    ("elasticsearch", "6.8.23", 5, None),
    ("opensearch", "1.3.20", 6, None),
    ("opensearch", "3.8.0", 7, None),
    ("elasticsearch", "version unknown", 6, None),
])
def test_version_problem_table(flavour, version, configured, problem):
    found = tracking.version_problem(flavour, version, configured)
    if problem is None:
        assert found is None
    else:
        assert found is not None and "esMajorVersion %d does not fit" % configured in found
        assert found.endswith(problem)


def test_check_fails_when_es_major_version_does_not_fit_the_server(standin, tmp_path):
    result = check(tmp_path, {"url": standin.url, "esMajorVersion": 6})
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL ")
    assert "elasticsearch 8.15.0" in result.stdout
    assert "esMajorVersion 6 does not fit this server (its requests would be refused): set 8" in result.stdout


def test_check_fails_on_something_that_is_not_a_search_server(standin, tmp_path):
    standin.root = None
    standin.respond_with((404, {}, {}))
    result = check(tmp_path, {"url": standin.url})
    assert result.returncode == 1
    assert "unexpected answer to GET /: 404" in result.stdout


def test_check_reports_opensearch(standin, tmp_path):
    standin.root = {"version": {"distribution": "opensearch", "number": "2.19.1"}}
    result = check(tmp_path, {"url": standin.url})
    assert result.returncode == 0
    assert "opensearch 2.19.1" in result.stdout


@pytest.mark.parametrize("answer", [
    (400, {"error": "no handler found for uri [/_security/user/_has_privileges] and method [POST]"}),
    (400, {"error": {"type": "invalid_index_name_exception",  # Elasticsearch 7 without x-pack
                     "reason": "Invalid index name [_security], must not start with '_', '-', or '+'"}}),
    (500, {"error": {"type": "exception", "reason": "Security must be explicitly enabled"}}),
])
def test_check_without_security_says_so(standin, tmp_path, answer):
    standin.privileges = answer
    result = check(tmp_path, {"url": standin.url})
    assert result.returncode == 0
    assert "security not enabled" in result.stdout


def test_check_reports_authentication_failure(standin, tmp_path):
    standin.privileges = (401, {"error": {"type": "security_exception", "reason": "unable to authenticate"}})
    result = check(tmp_path, {"url": standin.url, "authentication": basic_auth()})
    assert result.returncode == 1
    assert "authentication failed (401 security_exception" in result.stdout


def test_check_reports_unreachable_servers_one_line_each(standin, tmp_path):
    dead = "http://127.0.0.1:%d" % unused_port()
    result = check(tmp_path, {"url": standin.url}, {"url": dead, "timeout": 1})
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("ok") and lines[1].startswith("FAIL")
    assert "connection refused" in lines[1]


def test_check_of_hanging_servers_ends_with_the_longest_budget_not_their_sum(tmp_path):
    servers = [Trickle(), Trickle()]  # they answer a byte at a time and never finish
    try:
        started = time.monotonic()
        result = check(tmp_path, *({"url": server.url, "timeout": 1} for server in servers))
        elapsed = time.monotonic() - started
    finally:
        for server in servers:
            server.close()
    assert result.returncode == 1
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["FAIL", "FAIL"]
    assert elapsed < 3 * 1 + 0.25 + 1.5  # one budget of three requests, plus start-up; not two


def test_check_reports_tls_problems(standin_factory, certificates, tmp_path):
    https = standin_factory(certificates.server_context())
    result = check(tmp_path, {"url": https.url})
    assert result.returncode == 1
    assert "tls: certificate verify failed" in result.stdout


def test_check_needs_no_template_arguments_and_validates_first(tmp_path):
    result = check(tmp_path, {"url": "http://h", "timeout": "5s"})
    assert result.returncode == 2
    assert "clients[0].timeout" in result.stderr


@pytest.mark.parametrize("status", [403, 404, 500])
def test_check_fails_when_the_privilege_question_is_refused(standin, tmp_path, status):
    standin.privileges = (status, {"error": {"type": "security_exception", "reason": "denied"}})
    result = check(tmp_path, {"url": standin.url, "authentication": basic_auth()})
    assert result.returncode == 1
    assert "cannot check the write privilege (%d security_exception: denied)" % status in result.stdout


def test_check_opensearch_with_security_is_authenticated(standin, tmp_path):
    standin.root = {"version": {"distribution": "opensearch", "number": "2.19.1"}}
    standin.respond_with((200, {"user_name": "tracking", "roles": ["writer"]}, {}))
    result = check(tmp_path, {"url": standin.url, "authentication": basic_auth()})
    assert result.returncode == 0
    assert "opensearch 2.19.1" in result.stdout and "authenticated" in result.stdout


def test_dry_run_still_works_when_disabled(tmp_path):
    result = run_probe("--dry-run", "maven", "1", env=probe_env(TRACKING_DISABLED="1"))
    assert result.returncode == 0
    assert json.loads(result.stdout)["template"]["name"] == "maven"
    assert "disabled" in result.stderr


def test_output_is_utf8_whatever_the_locale(tmp_path):
    env = probe_env(PYTHONIOENCODING="ascii", CI_JOB_NAME="déploiement ✓")
    result = subprocess.run([sys.executable, TRACKING, "--dry-run", "maven", "1"], env=env,
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0
    assert json.loads(result.stdout.decode("utf-8"))["ci"]["job"]["name"] == "déploiement ✓"


def test_check_names_the_node_that_answered(standin, tmp_path):
    dead = "http://127.0.0.1:%d" % unused_port()
    result = check(tmp_path, {"urls": [dead, standin.url], "timeout": 2})
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("ok    %s  elasticsearch 8.15.0" % standin.url)


def test_check_of_an_empty_configuration_fails(tmp_path):
    result = check(tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL  no server configured")


@pytest.mark.parametrize(("status", "error"), [
    (400, "no handler found for uri [/_security/user/_has_privileges] and method [POST]"),
    (500, "Security must be explicitly enabled when using a [basic] license"),
    (400, "invalid_index_name_exception: Invalid index name [_plugins], must not start with '_'."),
    (404, "index_not_found_exception: no such index [_plugins]"),  # OpenSearch 1.x
])
def test_check_reads_a_server_without_security_as_writable(status, error):
    ok, text = tracking.unchecked(tracking.Response(status, error), "opensearch 1.3.20", "ci-job-2026.12")
    assert ok and "security not enabled" in text


def test_check_fails_a_privilege_question_refused_for_another_reason():
    ok, text = tracking.unchecked(tracking.Response(403, "security_exception: no"), "elasticsearch 8", "i")
    assert not ok and "cannot check the write privilege (403" in text
