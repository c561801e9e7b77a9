"""Shared pieces: run the probe as users do, an Elasticsearch stand-in, test certificates,
and a sentinel secret that must never appear in anything the probe prints."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACKING = str(ROOT / "tracking.py")
sys.path.insert(0, str(ROOT))

SECRET = "S3ntinel-pa55w0rd-Zq9"  # every test configuration uses it; no output may show it
SECRET_FORMS = (SECRET, base64.b64encode(("tracking:" + SECRET).encode()).decode())

# A GitLab job as the runner describes it to the probe.
GITLAB_ENV = {
    "CI_SERVER_URL": "https://gitlab.example.com",
    "GITLAB_USER_ID": "6097",
    "GITLAB_USER_LOGIN": "pismy",
    "CI_PROJECT_ID": "23568",
    "CI_PROJECT_URL": "https://gitlab.example.com/to-be-continuous/samples/maven-library",
    "CI_COMMIT_REF_NAME": "master",
    "CI_JOB_ID": "8585338",
    "CI_JOB_NAME": "mvn-build",
    "CI_JOB_STAGE": "package-publish",
    "CI_JOB_URL": "https://gitlab.example.com/to-be-continuous/samples/maven-library/-/jobs/8585338",
    "CI_PIPELINE_ID": "1835260",
    "CI_PIPELINE_URL": "https://gitlab.example.com/to-be-continuous/samples/maven-library/-/pipelines/1835260",
    "CI_RUNNER_ID": "44949",
    "CI_RUNNER_DESCRIPTION": "shared-runners-manager-4.gitlab.com",
    "CI_RUNNER_TAGS": '["gce", "east-c", "shared", "docker", "linux"]',
    "CI_RUNNER_VERSION": "13.12.0-rc1",
}

_outputs: list[str] = []


def probe_env(**variables: str) -> dict[str, str]:
    """A clean environment: PATH, the GitLab job, and the case's own variables."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GITLAB_ENV}
    env.update(variables)
    return {k: v for k, v in env.items() if v is not None}


def run_probe(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
              python: tuple[str, ...] = (), stdin: int | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run tracking.py exactly as a job does, and keep its output for the secret check."""
    command = [sys.executable, *python, TRACKING, *args]
    result = subprocess.run(command, env=probe_env() if env is None else env, capture_output=True,
                            text=True, timeout=timeout, check=False, stdin=stdin)
    _outputs.extend((result.stdout, result.stderr))
    return result


def start_probe(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start tracking.py in the background (service mode); read its output with finish_probe."""
    return subprocess.Popen([sys.executable, TRACKING, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_probe(process: subprocess.Popen[str], timeout: float = 10) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    _outputs.extend((stdout, stderr))
    return stdout, stderr


@pytest.fixture(autouse=True)
def no_secret_in_output():
    """Whatever a test does, the sentinel secret never reaches stdout or stderr."""
    _outputs.clear()
    yield
    for text in _outputs:
        for form in SECRET_FORMS:
            assert form not in text, "a secret leaked into the probe's output:\n" + text


def write_config(directory: Path, *clients: dict) -> str:
    path = directory / "config.json"
    path.write_text(json.dumps({"clients": list(clients)}), encoding="utf-8")
    return str(path)


def basic_auth() -> dict[str, str]:
    return {"username": "tracking", "password": SECRET}


# ---------------------------------------------------------------- the Elasticsearch stand-in


class Recorded:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def json(self) -> dict:
        return json.loads(self.body.decode("utf-8"))


class StandIn:
    """An Elasticsearch stand-in on 127.0.0.1 (port 0): records each request and answers
    from a script of statuses, then like Elasticsearch (201 created, 409 when the id exists)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Recorded] = []
        self.documents: dict[str, dict] = {}
        self.script: list[tuple[int, dict, dict]] = []
        self.root: dict | None = {"name": "standin", "tagline": "You Know, for Search",
                                  "version": {"number": "8.15.0", "build_flavor": "default"}}
        self.granted = {"create_doc": True, "indices:admin/auto_create": True}
        self.privileges: tuple[int, dict] | None = None  # an answer to _has_privileges instead
        self.gate: threading.Event | None = None  # when set, PUT answers wait for it
        self.arrived = threading.Condition()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = Recorded(self.command, self.path, dict(self.headers.items()), body)
                status, answer, headers = standin.answer(recorded)
                with standin.arrived:
                    standin.requests.append(recorded)
                    standin.arrived.notify_all()
                if standin.gate is not None and self.command == "PUT":
                    standin.gate.wait(30)
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = "%s://127.0.0.1:%d" % (scheme, self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def respond_with(self, *answers: int | tuple) -> None:
        """Answer the next requests with these statuses (or (status, body, headers))."""
        for answer in answers:
            if isinstance(answer, int):
                answer = (answer, error_body(answer), {})
            status, body, headers = (*answer, {})[:3] if len(answer) == 2 else answer
            self.script.append((status, body, headers))

    def answer(self, request: Recorded) -> tuple[int, dict, dict]:
        if request.method == "GET" and request.path == "/" and self.root is not None:
            return 200, self.root, {"X-elastic-product": "Elasticsearch"}
        if "_has_privileges" in request.path:
            return (*self.privileges, {}) if self.privileges else self.privileges_answer(request)
        if self.script:
            return self.script.pop(0)
        if request.method == "PUT":
            if request.path in self.documents:
                return 409, error_body(409), {}
            self.documents[request.path] = request.json()
            return 201, {"result": "created", "_id": request.path.split("/")[-1]}, {}
        return 400, {"error": "no handler found for uri [%s] and method [%s]"  # as Elasticsearch
                     % (request.path, request.method), "status": 400}, {}

    def privileges_answer(self, request: Recorded) -> tuple[int, dict, dict]:
        """What Elasticsearch answers to _has_privileges, from self.granted."""
        [asked] = request.json()["index"]
        index = {name: {p: self.granted.get(p, False) for p in asked["privileges"]}
                 for name in asked["names"]}
        every = all(all(v.values()) for v in index.values())
        return 200, {"username": "tracking", "has_all_requested": every, "cluster": {},
                     "index": index, "application": {}}, {}

    def puts(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PUT"]

    def wait_for_requests(self, count: int, timeout: float = 10) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()


ERRORS = {
    400: ("mapper_parsing_exception", "failed to parse field [ci.job.id] of type [long]"),
    401: ("security_exception", "unable to authenticate user [tracking] for REST request [/]"),
    403: ("security_exception", "action [indices:data/write/index] is unauthorized"),
    404: ("index_not_found_exception", "no such index [tbc-ci-job]"),
    409: ("version_conflict_engine_exception", "[1]: version conflict, document already exists"),
    429: ("es_rejected_execution_exception", "rejected execution of coordinating operation"),
    503: ("unavailable_shards_exception", "primary shard is not active"),
}


def error_body(status: int) -> dict:
    kind, reason = ERRORS.get(status, ("exception", "status %d" % status))
    return {"error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind,
                      "reason": reason}, "status": status}


@pytest.fixture
def standin():
    server = StandIn()
    yield server
    server.close()


@pytest.fixture
def standin_factory():
    """Start as many stand-ins as a test needs (plain, or with a TLS context)."""
    servers: list[StandIn] = []

    def make(tls: ssl.SSLContext | None = None) -> StandIn:
        servers.append(StandIn(tls))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


# ---------------------------------------------------------------- misbehaving servers


class Blackhole:
    """Accepts TCP connections and never answers a byte."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)
            self._serve(connection)

    def _serve(self, connection: socket.socket) -> None:
        """A blackhole leaves the connection open and silent."""

    def close(self) -> None:
        self.stop.set()
        self.socket.close()
        for connection in self.connections:
            connection.close()


class Trickle(Blackhole):
    """Reads the request, then answers one byte every `pace` seconds, for ever.

    head: bytes sent at once first (a whole "201 Created" status and headers, say)."""

    def __init__(self, pace: float = 0.2, head: bytes = b"") -> None:
        self.pace = pace
        self.head = head
        super().__init__()

    def _serve(self, connection: socket.socket) -> None:
        threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        answer = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Padding: " + b"." * 10000
        if self.head:
            answer = b" " * 100000  # the rest of the body
        try:
            connection.recv(65536)
            connection.sendall(self.head)
            for byte in answer:
                if self.stop.wait(self.pace):
                    return
                connection.sendall(bytes([byte]))
        except OSError:
            return


@pytest.fixture
def blackhole():
    server = Blackhole()
    yield server
    server.close()


@pytest.fixture
def trickle():
    server = Trickle()
    yield server
    server.close()


def unused_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- a forward proxy


class Proxy:
    """A minimal HTTP forward proxy: CONNECT tunnels and absolute-URI requests; records targets."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            line, rest = head.split(b"\r\n", 1)
            method, target, version = line.decode().split(" ")
            self.targets.append("%s %s" % (method, target))
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = b""
            else:
                authority = target.split("://", 1)[1].split("/", 1)[0]
                host, port = authority.rsplit(":", 1)
                path = "/" + target.split("://", 1)[1].split("/", 1)[1]
                upstream = socket.create_connection((host, int(port)))
                first = ("%s %s %s\r\n" % (method, path, version)).encode() + rest
            with upstream:
                if first:
                    upstream.sendall(first)
                pipe(client, upstream)

    def close(self) -> None:
        self.socket.close()


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (bounded by a 10 s idle limit)."""
    sockets = [a, b]
    while True:
        readable, _, _ = select.select(sockets, [], [], 10)
        if not readable:
            return
        for source in readable:
            data = source.recv(65536)
            if not data:
                return
            (b if source is a else a).sendall(data)


@pytest.fixture
def proxy():
    server = Proxy()
    yield server
    server.close()


# ---------------------------------------------------------------- certificates


class Certificates:
    """A test CA, a server certificate for 127.0.0.1/localhost, a client certificate."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.client = self.ca.issue_cert("tracking-client@example.com")
        self.ca_path = str(directory / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        self.ca_pem = self.ca.cert_pem.bytes().decode()
        self.other_ca_path = str(directory / "other-ca.pem")
        self.other_ca.cert_pem.write_to_path(self.other_ca_path)
        self.client_cert_path = str(directory / "client.pem")
        self.client_key_path = str(directory / "client.key")
        self.client.cert_chain_pems[0].write_to_path(self.client_cert_path)
        self.client.private_key_pem.write_to_path(self.client_key_path)

    def server_context(self, require_client_certificate: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(context)
        if require_client_certificate:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    return Certificates(tmp_path_factory.mktemp("certificates"))


# ---------------------------------------------------------------- the image's base


@pytest.fixture(scope="session")
def base() -> str:
    """The local equivalent of the distroless base image (tests/imagebase.py), built once."""
    import imagebase

    reason = imagebase.missing_tools()
    if reason:
        pytest.skip(reason)
    return imagebase.ensure_base()


# ---------------------------------------------------------------- no silent skips in CI


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With TRACKING_NO_SKIP=1 (set by .ci/run) a skipped test fails: CI installed everything,
    so a skip there means a test that did not run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("TRACKING_NO_SKIP") == "1":
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = "skipped, but TRACKING_NO_SKIP=1 (CI) requires every test to run: %s" % reason
