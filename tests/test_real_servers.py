"""tracking.py against real Elasticsearch and OpenSearch servers (see tests/realservers.py).

Each server starts once and is shared by the tests that need it; at most two
JVMs run at once. Without Java or Maven, or when a download fails, these tests
skip with the reason, unless TRACKING_REQUIRE_REAL_SERVERS=1 (CI), where they fail.

Run: python -m pytest -m integration tests/test_real_servers.py
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import realservers
from conftest import GITLAB_ENV
from realservers import ELASTICSEARCH, OPENSEARCH

pytestmark = pytest.mark.integration

TRACKING = str(Path(__file__).resolve().parent.parent / "tracking.py")
REQUIRE_SERVERS = os.environ.get("TRACKING_REQUIRE_REAL_SERVERS") == "1"

# (flavour, version, security, tls): the server each flavour's common tests run against.
# Elasticsearch 8 runs with security and HTTPS so that one instance serves every ES 8 case;
# 9 with security over plain HTTP; 7.17 and the OpenSearch integ-test zips without security.
ES8 = (ELASTICSEARCH, "8.19.21", True, True)
# 8.8.2: the newest 8.x integ-test zip that still answers GET / (8.9+ moved that
# handler into the rest-root module, which the integ-test zip leaves out).
ES8_WITH_ROOT = (ELASTICSEARCH, "8.8.2", True, True)
MATRIX = [
    (OPENSEARCH, "2.19.6", False, False),
    (OPENSEARCH, "3.8.0", False, False),
    (ELASTICSEARCH, "7.17.29", False, False),
    ES8,
    (ELASTICSEARCH, "9.2.4", True, False),
    (OPENSEARCH, "1.3.20", False, False),  # last: MATRIX[0] and MATRIX[4] are named below
    (ELASTICSEARCH, "6.8.23", False, False),  # esMajorVersion 6: typed URLs (an oss zip)
]

POOL = realservers.ServerPool(max_running=2)  # 2 cores on a shared box
_unavailable: dict[tuple, str] = {}

# The job of conftest.py; each test gives its own CI_JOB_ID (and CI_JOB_URL).
GITLAB_JOB = {k: v for k, v in GITLAB_ENV.items() if k not in ("CI_JOB_ID", "CI_JOB_URL")}


def server_id(key):
    flavour, version, security, tls = key
    return f"{flavour}-{version}" + ("-security" if security else "") + ("-tls" if tls else "")


def obtain(key):
    """The running server for key, started on first use; skip (or fail in CI) when impossible."""
    if key in _unavailable:
        unavailable(_unavailable[key])
    try:
        return POOL.get(*key)
    except realservers.ServerUnavailable as error:
        _unavailable[key] = f"{server_id(key)}: {error}"
        unavailable(_unavailable[key])


def unavailable(reason):
    if REQUIRE_SERVERS:
        pytest.fail(f"TRACKING_REQUIRE_REAL_SERVERS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def stop_servers_at_the_end():
    yield
    POOL.stop_all()


# Module scope and params: pytest groups the tests by server, so each starts once.
@pytest.fixture(scope="module", params=MATRIX, ids=server_id)
def server(request):
    return obtain(request.param)


@pytest.fixture(scope="module", params=[ES8_WITH_ROOT, ES8], ids=server_id)
def secure_es8(request):
    return obtain(request.param)


@pytest.fixture
def es8():
    return obtain(ES8)


# Secured Elasticsearch 8 and 9: API keys (the .security index) work on both, thanks to the
# test plugin realservers builds from tests/esplugin/.
@pytest.fixture(scope="module", params=[ES8, MATRIX[4]], ids=server_id)
def secure_es(request):
    return obtain(request.param)


@pytest.fixture
def prefix(request):
    """A fresh index prefix per test: tests never see each other's documents."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]
    return f"it-{name}-{secrets.randbelow(10**6)}-"


# ---------------------------------------------------------------- helpers


def job_env(config, **extra):
    """An environment built from scratch: PATH, a GitLab job with a fresh job id, the config."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GITLAB_JOB}
    job_id = str(10**8 + secrets.randbelow(9 * 10**8))
    env["CI_JOB_ID"] = job_id
    env["CI_JOB_URL"] = f"{GITLAB_JOB['CI_PROJECT_URL']}/-/jobs/{job_id}"
    env["TRACKING_CONFIGURATION"] = json.dumps({"clients": config})
    env.update(extra)
    return env


def run_tracking(*args, env, timeout=60):
    return subprocess.run(
        [sys.executable, TRACKING, *args], env=env, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )


def dry_run(env):
    """The document and, per client, the index and id the real run will use."""
    result = run_tracking("--dry-run", "maven", "4.2.0", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def read_document(server, index, identifier):
    status, body = server.request("GET", f"/{index}/_doc/{identifier}")
    assert status == 200, (status, body)
    return body["_source"]


def count_documents(server, index):
    server.request("POST", f"/{index}/_refresh")
    status, body = server.request("GET", f"/{index}/_count")
    assert status == 200, body
    return body["count"]


def assert_same_json(actual, expected, path="$"):
    """Equal values of equal JSON types (1 == 1.0 == True in Python, not in JSON)."""
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_json(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for position, (a, e) in enumerate(zip(actual, expected)):
            assert_same_json(a, e, f"{path}[{position}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def field_types(mapping_properties, path=""):
    """{"ci.job.id": "long", ...} from a mapping's properties."""
    types = {}
    for name, field in mapping_properties.items():
        full = f"{path}{name}"
        if "properties" in field:
            types.update(field_types(field["properties"], full + "."))
        else:
            types[full] = field.get("type")
    return types


def json_leaves(value, path=""):
    """{"a.b": leaf value} for every leaf of a JSON object."""
    if not isinstance(value, dict):
        return {path: value}
    leaves = {}
    for key, item in value.items():
        leaves.update(json_leaves(item, f"{path}.{key}" if path else key))
    return leaves


def log_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("tracking: ")]


# ---------------------------------------------------------------- every flavour


def test_document_round_trips_with_every_field_type_and_mapping(server, prefix):
    env = job_env([server.client_config(indexPrefix=prefix)])
    plan = dry_run(env)
    (request,) = plan["requests"]
    index, identifier = request["index"], request["documentId"]
    assert index.startswith(prefix + "ci-job-")

    result = run_tracking("maven", "4.2.0", env=env)

    assert result.returncode == 0, result.stderr
    (line,) = log_lines(result.stderr)
    assert f"index={index} delivered status=201 attempts=1" in line
    stored = read_document(server, index, identifier)
    expected = plan["document"]
    # The dry run was a moment earlier: @timestamp may differ by a second or two.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stored.pop("@timestamp"))
    expected.pop("@timestamp")
    assert_same_json(stored, expected)
    assert stored["ci"]["job"]["id"] == int(env["CI_JOB_ID"])
    assert stored["ci"]["runner"]["tags"] == "gce, east-c, shared, docker, linux"

    status, mapping = server.request("GET", f"/{index}/_mapping")
    assert status == 200, mapping
    mappings = mapping[index]["mappings"]
    types = field_types(mappings.get("_doc", mappings)["properties"])  # 6.x: under the type
    assert types["@timestamp"] == "date"
    # Every field of the document is mapped, and by its JSON type: integers long, strings text.
    leaves = json_leaves(expected)  # without @timestamp, popped above
    assert set(types) == {*leaves, "@timestamp"}
    for field, value in leaves.items():
        assert types[field] == ("long" if isinstance(value, int) else "text"), field


def test_same_job_twice_stores_exactly_one_document(server, prefix):
    env = job_env([server.client_config(indexPrefix=prefix)])
    index = dry_run(env)["requests"][0]["index"]

    first = run_tracking("maven", "4.2.0", env=env)
    second = run_tracking("maven", "4.2.0", "--strict", env=env)  # 409 still counts as delivered

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "delivered status=201" in first.stderr
    assert "delivered status=409" in second.stderr
    assert count_documents(server, index) == 1


def test_dead_address_does_not_hold_back_the_real_server(server, prefix, blackhole_server):
    timeout = 2
    env = job_env([
        server.client_config(indexPrefix=prefix),
        {"url": blackhole_server, "timeout": timeout, "indexPrefix": prefix},
    ])
    request = dry_run(env)["requests"][0]
    index, identifier = request["index"], request["documentId"]

    started = time.monotonic()
    result = run_tracking("--strict", "maven", "4.2.0", env=env)
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stderr  # --strict: one server failed
    assert 0 < elapsed < timeout + 3, elapsed  # the budget plus interpreter start and a margin
    lines = log_lines(result.stderr)
    assert any(server.url in line and "delivered status=201" in line for line in lines), lines
    dead = [line for line in lines if blackhole_server in line]
    assert dead and "failed" in dead[0] and "error=timeout" in dead[0], lines
    read_document(server, index, identifier)


def test_check_names_flavour_and_version(server, prefix):
    env = job_env([server.client_config(indexPrefix=prefix)])

    result = run_tracking("--check", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("ok ")
    assert f"{server.flavour} {server.version}" in line
    assert "can write" in line


# ---------------------------------------------------------------- several servers


def test_two_real_servers_in_one_configuration_both_receive_it(prefix):
    opensearch = obtain(MATRIX[0])
    elasticsearch = obtain(ES8)
    opensearch = POOL.get(*MATRIX[0], keep=(elasticsearch,))  # still running (pool of two)
    env = job_env([opensearch.client_config(indexPrefix=prefix),
                   elasticsearch.client_config(indexPrefix=prefix)])
    plan = dry_run(env)

    result = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert result.returncode == 0, result.stderr
    assert len([line for line in log_lines(result.stderr) if "delivered status=201" in line]) == 2
    for target, request in zip((opensearch, elasticsearch), plan["requests"]):
        stored = read_document(target, request["index"], request["documentId"])
        assert stored["ci"]["job"]["id"] == int(env["CI_JOB_ID"])


# ---------------------------------------------------------------- Elasticsearch 8 and 9 security


def writer_key(server, prefix):
    """An API key with the probe's least privilege: create_doc + auto_configure on prefix*."""
    return server.create_api_key("tracking-probe-test", {"tracking_writer": {
        "indices": [{"names": [f"{prefix}*"], "privileges": ["create_doc", "auto_configure"]}]}})


def test_basic_auth_api_key_and_bearer_token_all_deliver(secure_es, prefix):
    api_key = writer_key(secure_es, "apikey-" + prefix)
    service_token = secure_es.create_service_token()
    env = job_env([
        secure_es.client_config(indexPrefix=prefix),  # Basic, the admin user
        secure_es.client_config(indexPrefix="apikey-" + prefix, authentication={"apiKey": api_key}),
        # elastic/fleet-server may write logs-*
        secure_es.client_config(indexPrefix="logs-" + prefix,
                                authentication={"bearerToken": service_token}),
    ])
    plan = dry_run(env)

    result = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert result.returncode == 0, result.stderr
    assert len([line for line in log_lines(result.stderr) if "delivered status=201" in line]) == 3
    for secret in (api_key, service_token, secure_es.admin_auth[1]):
        assert secret not in result.stderr + result.stdout
    for request in plan["requests"]:
        read_document(secure_es, request["index"], request["documentId"])


def test_least_privilege_api_key_writes_but_cannot_read_or_stray(secure_es, prefix):
    api_key = writer_key(secure_es, prefix)
    status, who = secure_es.request("GET", "/_security/_authenticate", auth="ApiKey " + api_key)
    assert status == 200 and who["authentication_type"] == "api_key", who
    env = job_env([secure_es.client_config(indexPrefix=prefix, authentication={"apiKey": api_key})])
    request = dry_run(env)["requests"][0]
    stray = job_env([secure_es.client_config(indexPrefix="other-" + prefix,
                                             authentication={"apiKey": api_key})])

    delivered = run_tracking("--strict", "maven", "4.2.0", env=env)  # a new index: auto_configure
    refused = run_tracking("--strict", "maven", "4.2.0", env=stray)  # outside the key's indices

    assert delivered.returncode == 0, delivered.stderr
    assert "delivered status=201" in delivered.stderr
    read_document(secure_es, request["index"], request["documentId"])  # as admin
    status, _ = secure_es.request("GET", f"/{request['index']}/_doc/{request['documentId']}",
                                  auth="ApiKey " + api_key)
    assert status == 403  # the key really cannot read
    assert refused.returncode == 1, refused.stderr
    (line,) = log_lines(refused.stderr)
    assert "failed status=403" in line and "security_exception" in line, line
    assert api_key not in delivered.stderr + refused.stderr


def test_wrong_password_fails_open_and_strict_fails(es8, prefix):
    wrong = {"username": es8.admin_auth[0], "password": "Wr0ng-pa55word-x7"}
    basic = base64.b64encode(f"{wrong['username']}:{wrong['password']}".encode()).decode()
    env = job_env([es8.client_config(indexPrefix=prefix, authentication=wrong)])

    lenient = run_tracking("maven", "4.2.0", env=env)
    strict = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert lenient.returncode == 0, lenient.stderr
    assert strict.returncode == 1, strict.stderr
    for result in (lenient, strict):
        (line,) = log_lines(result.stderr)
        assert "failed status=401" in line
        # the server's own reason, e.g. "security_exception: unable to authenticate user [...]"
        assert "security_exception: unable to authenticate user" in line, line
        for secret in (wrong["password"], basic, es8.admin_auth[1]):
            assert secret not in result.stderr + result.stdout


def test_least_privilege_role_delivers_and_check_says_can_write(secure_es8, prefix):
    """create_doc + auto_configure, no read: the role we document for the probe."""
    user, password = secure_es8.create_user(
        {"indices": [{"names": [f"{prefix}*"], "privileges": ["create_doc", "auto_configure"]}]})
    env = job_env([secure_es8.client_config(
        indexPrefix=prefix, authentication={"username": user, "password": password})])
    request = dry_run(env)["requests"][0]

    delivered = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert delivered.returncode == 0, delivered.stderr
    assert "delivered status=201" in delivered.stderr  # into a new index: auto_configure made it
    read_document(secure_es8, request["index"], request["documentId"])  # as admin
    status, _ = secure_es8.request("GET", f"/{request['index']}/_doc/{request['documentId']}",
                                   auth=(user, password))
    assert status == 403  # the role really cannot read

    checked = run_tracking("--check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok ")
    assert "can write" in checked.stdout
    assert password not in checked.stdout + checked.stderr


def test_create_doc_alone_writes_only_into_an_existing_index(es8, prefix):
    """Only create_doc on <prefix>*, no read: delivers, but into an index that exists (without
    auto_configure or create_index every job gets 403 until the month's index exists)."""
    user, password = es8.create_user({"indices": [{"names": [f"{prefix}*"], "privileges": ["create_doc"]}]})
    env = job_env([es8.client_config(
        indexPrefix=prefix, authentication={"username": user, "password": password})])
    request = dry_run(env)["requests"][0]
    index = request["index"]

    missing = run_tracking("--strict", "maven", "4.2.0", env=env)
    status, body = es8.request("PUT", f"/{index}")  # the admin creates this month's index
    assert status == 200, body
    existing = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert missing.returncode == 1, missing.stderr
    (line,) = log_lines(missing.stderr)
    assert "failed status=403" in line and "security_exception" in line and "auto_create" in line, line
    assert existing.returncode == 0, existing.stderr
    assert "delivered status=201" in existing.stderr
    read_document(es8, index, request["documentId"])  # as admin
    status, _ = es8.request("GET", f"/{index}/_doc/{request['documentId']}", auth=(user, password))
    assert status == 403  # the role really cannot read
    checked = run_tracking("--check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok ") and "can write (to an existing index only" in checked.stdout


def test_role_without_write_fails_check(secure_es8, prefix):
    user, password = secure_es8.create_user(
        {"cluster": ["monitor"], "indices": [{"names": [f"{prefix}*"], "privileges": ["read"]}]})
    env = job_env([secure_es8.client_config(
        indexPrefix=prefix, authentication={"username": user, "password": password})])

    checked = run_tracking("--check", env=env)

    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert checked.stdout.startswith("FAIL ")
    assert "elasticsearch" in checked.stdout  # the version too, where the role may read "/"
    assert "cannot write" in checked.stdout


def test_wrong_major_version_is_reported(es8, prefix):
    env = job_env([es8.client_config(indexPrefix=prefix, esMajorVersion=6)])
    assert dry_run(env)["requests"][0]["url"].endswith("/_create")

    lenient = run_tracking("maven", "4.2.0", env=env)
    strict = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert lenient.returncode == 0, lenient.stderr
    assert strict.returncode == 1, strict.stderr
    (line,) = log_lines(strict.stderr)
    assert "failed status=400" in line, line
    assert "no handler found for uri" in line, line
    assert "does esMajorVersion 6 fit this server?" in line, line
    checked = run_tracking("--check", env=env)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert checked.stdout.startswith("FAIL ") and "elasticsearch 8.19.21" in checked.stdout, checked.stdout
    assert "esMajorVersion 6 does not fit this server" in checked.stdout and "set 8" in checked.stdout


# ---------------------------------------------------------------- HTTPS


def test_https_without_ca_fails_with_a_tls_error(es8, prefix):
    config = es8.client_config(indexPrefix=prefix, timeout=5)
    del config["caCertificate"]
    env = job_env([config])

    result = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert result.returncode == 1, result.stderr
    (line,) = log_lines(result.stderr)
    assert "failed" in line and "tls" in line and "certificate verify failed" in line, line


def test_https_with_inline_ca_pem_delivers(es8, prefix):
    config = es8.client_config(indexPrefix=prefix)
    config["caCertificate"] = Path(es8.ca_path).read_text()
    env = job_env([config])

    result = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert result.returncode == 0, result.stderr
    assert "delivered status=201" in result.stderr


def test_skip_ssl_verification_delivers_with_a_warning(es8, prefix):
    config = es8.client_config(indexPrefix=prefix, skipSslVerification=True)
    del config["caCertificate"]
    env = job_env([config])
    request = dry_run(env)["requests"][0]

    result = run_tracking("--strict", "maven", "4.2.0", env=env)

    assert result.returncode == 0, result.stderr
    assert "delivered status=201" in result.stderr
    assert re.search(r"warning: .*(verification|skipSslVerification)", result.stderr), result.stderr
    read_document(es8, request["index"], request["documentId"])


@pytest.fixture
def blackhole_server():
    """A loopback port that accepts connections (kernel backlog) and never answers."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield "http://127.0.0.1:%d" % listener.getsockname()[1]
    listener.close()
