"""The container image: built from the real Dockerfile, run the way GitLab Runner runs a service.

The base is tests/imagebase.py's local equivalent of gcr.io/distroless/python3-debian13:nonroot
(same Debian 13 packages, unpacked without maintainer scripts). The runner's docker executor
starts a service with the job's public variables in its environment and the service's
`command` appended to the image's ENTRYPOINT; it dials the exposed port, and removes the
container at the end of the job. These tests do the same with podman (runc, host network).

Measurements (start-up time with and without the precompiled modules, image sizes) are printed
and written to <cache>/image-report.json; README.md quotes them.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagebase
from conftest import GITLAB_ENV, Recorded, StandIn

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/tracking-probe:test"
IMAGE_UNCONFIGURED = "localhost/tracking-probe:test-unconfigured"
SERVICE_PORT = 18733
NO_PYC = ("-B", "-X", "pycache_prefix=/nonexistent")  # read no .pyc, write none
RUNS = 5  # per measurement; medians are reported

# What a GitLab job gives a service: its public variables (ids are decimal strings).
JOB_ENV = dict(GITLAB_ENV, CI="true", GITLAB_CI="true")


# ==== The Elasticsearch stand-in of conftest.py, module-wide (the image bakes its URL)


def wait_for_put(server: StandIn, timeout: float = 30) -> tuple[Recorded, float]:
    """The first document indexed, and when it arrived (time.monotonic())."""
    with server.arrived:
        arrived = server.arrived.wait_for(server.puts, timeout)
    assert arrived, "no document arrived within %s s" % timeout
    return server.puts()[0], time.monotonic()


def reset(server: StandIn) -> StandIn:
    with server.arrived:
        server.requests.clear()
        server.documents.clear()
    return server


# ==== podman helpers


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *args], env=imagebase.podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        output = proc.stdout + proc.stderr
        raise AssertionError("podman %s exited %d\n%s" % (args[0], proc.returncode, output))
    return proc


def env_args(env: dict[str, str]) -> list[str]:
    return [arg for name, value in env.items() for arg in ("-e", "%s=%s" % (name, value))]


def inspect(image: str) -> dict[str, object]:
    return json.loads(podman("image", "inspect", image).stdout)[0]  # type: ignore[no-any-return]


def entrypoint(image: str, extra: tuple[str, ...] = ()) -> str:
    """The image's ENTRYPOINT with interpreter options inserted after the interpreter, as JSON."""
    command = inspect(image)["Config"]["Entrypoint"]  # type: ignore[index]
    return json.dumps([*command[:1], *extra, *command[1:]])


def port_answers(port: int, timeout: float = 10) -> bool:
    """True once a TCP connect to 127.0.0.1:port succeeds (what the runner's health check does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def port_free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]  # type: ignore[no-any-return]


class Service:
    """One service container, started detached like the runner does; removed at the end."""

    counter = 0

    def __init__(self, image: str, env: dict[str, str], command: list[str], options: tuple[str, ...] = ()):
        Service.counter += 1
        self.name = "tracking-test-%d-%d" % (os.getpid(), Service.counter)
        self.started = time.monotonic()
        podman("run", "-d", "--name", self.name, "--network=host", *options, *env_args(env), image, *command)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_for_log(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.logs()
            if text in logs:
                return logs
            time.sleep(0.2)
        raise AssertionError("%r not in the service's log within %s s:\n%s" % (text, timeout, self.logs()))

    def terminate(self) -> int:
        """SIGTERM (what Kubernetes sends), then the exit code."""
        podman("kill", "--signal", "TERM", self.name)
        return int(podman("wait", self.name, timeout=30).stdout.strip())

    def remove(self) -> None:
        podman("rm", "-f", self.name, check=False)


# ==== Fixtures: base, stand-in, images




@pytest.fixture(scope="module")
def target():
    server = StandIn()
    yield server
    server.close()


def build(base: str, tag: str, config: dict[str, object] | None) -> None:
    """buildah bud of the repository's Dockerfile, context = tracking.py (+ config.json)."""
    with tempfile.TemporaryDirectory(prefix="tracking-context-") as context:
        shutil.copy(ROOT / "tracking.py", context)
        if config is not None:
            Path(context, "config.json").write_text(json.dumps(config))
        proc = subprocess.run(
            ["buildah", "bud", "--format", "docker", "--isolation", "chroot", "--pull=false",
             "--build-arg", "BASE_IMAGE=" + base, "-f", str(ROOT / "Dockerfile"), "-t", tag, context],
            env=imagebase.podman_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def image(base: str, target: StandIn) -> str:
    """The image with a baked configuration that points at the stand-in."""
    build(base, IMAGE, {"clients": [{"url": target.url, "esMajorVersion": 8, "timeout": 5}]})
    return IMAGE


@pytest.fixture()
def fresh(target: StandIn) -> StandIn:
    return reset(target)


@pytest.fixture(scope="module")
def report():
    """Measurements, printed at the end of the module and kept in <cache>/image-report.json."""
    results: dict[str, object] = {}
    yield results
    if results:
        path = imagebase.cache_dir() / "image-report.json"
        path.write_text(json.dumps(results, indent=2))
        print("\nimage report (%s):\n%s" % (path, json.dumps(results, indent=2)), file=sys.__stderr__)


# ==== The image's shape


def test_image_metadata_nonroot_exposed_port_entrypoint_labels(image: str) -> None:
    config = inspect(image)["Config"]
    assert config["User"] == "65532"  # type: ignore[index]
    assert "%d/tcp" % SERVICE_PORT in config["ExposedPorts"]  # type: ignore[index]
    assert config["Entrypoint"][:2] == ["/usr/bin/python3.13", "-I"]  # type: ignore[index]
    assert config["Cmd"] == ["--service"]  # type: ignore[index]
    labels = config["Labels"]  # type: ignore[index]
    assert labels["org.opencontainers.image.title"] == "tracking-probe"
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/tracking-probe/")
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "clients" not in history and "password" not in history.lower()


def test_image_has_no_shell_and_read_only_root_owned_files(image: str) -> None:
    name = "tracking-export-%d" % os.getpid()
    podman("create", "--name", name, image)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            podman("export", "-o", tmp + "/rootfs.tar", name)
            with tarfile.open(tmp + "/rootfs.tar") as tar:
                members = {m.name.lstrip("./"): m for m in tar.getmembers()}
    finally:
        podman("rm", "-f", name, check=False)
    shells = [n for n in members if n.rsplit("/", 1)[-1] in imagebase.SHELLS and "/bin/" in "/" + n]
    assert shells == []
    for path in ("app/tracking.py", "app/config.json"):
        assert members[path].uid == 0 and members[path].mode & 0o777 == 0o444, path
    assert "app/__pycache__/tracking.cpython-313.pyc" in members
    assert podman("run", "--rm", "--entrypoint", "/bin/sh", image, "-c", "true", check=False).returncode != 0
    # the nonroot user cannot change what it runs
    write = "open('/app/config.json', 'a')"
    as_user = json.dumps(["/usr/bin/python3.13", "-c", write])
    proc = podman("run", "--rm", "--entrypoint", as_user, image, check=False)
    assert proc.returncode == 1 and "PermissionError" in proc.stderr
    ids = json.dumps(["/usr/bin/python3.13", "-c", "import os; print(os.getuid(), os.getgid())"])
    assert podman("run", "--rm", "--entrypoint", ids, image).stdout.split() == ["65532", "65532"]


# ==== As a GitLab service


def test_service_with_command_delivers_answers_port_and_exits_0_on_sigterm(
    image: str, fresh: StandIn
) -> None:
    if not port_free(SERVICE_PORT):
        pytest.fail("port %d is taken on this host: the exposed-port check needs it" % SERVICE_PORT)
    service = Service(image, JOB_ENV, ["--service", "maven", "4.1.0"])
    try:
        request, _ = wait_for_put(fresh)
        assert port_answers(SERVICE_PORT), "the exposed port does not answer"
        document = request.json()
        assert document["template"] == {"name": "maven", "version": "4.1.0"}  # type: ignore[index]
        assert document["ci"]["job"]["id"] == int(JOB_ENV["CI_JOB_ID"])  # type: ignore[index]
        assert request.path.startswith("/ci-job-")
        service.wait_for_log("delivered status=201")
        assert service.terminate() == 0
    finally:
        service.remove()


def test_service_without_command_takes_the_template_from_variables(image: str, fresh: StandIn) -> None:
    """A runner that drops the service's command runs CMD ["--service"]."""
    port = free_port()
    env = dict(JOB_ENV, TRACKING_TEMPLATE_NAME="python", TRACKING_TEMPLATE_VERSION="7.2.0",
               HEALTHCHECK_TCP_PORT=str(port))  # fmt: skip
    service = Service(image, env, [])
    try:
        document = wait_for_put(fresh)[0].json()
        assert document["template"] == {"name": "python", "version": "7.2.0"}  # type: ignore[index]
        assert port_answers(port)
        assert service.terminate() == 0
    finally:
        service.remove()


def test_image_without_configuration_builds_listens_and_sends_nothing(base: str, target: StandIn) -> None:
    build(base, IMAGE_UNCONFIGURED, None)
    port = free_port()
    env = dict(JOB_ENV, HEALTHCHECK_TCP_PORT=str(port))
    service = Service(IMAGE_UNCONFIGURED, env, ["--service", "maven", "1"])
    try:
        assert port_answers(port)
        service.wait_for_log("no server configured")
        assert service.terminate() == 0
    finally:
        service.remove()
        podman("rmi", "-f", IMAGE_UNCONFIGURED, check=False)


def test_service_delivers_to_a_real_opensearch(image: str) -> None:
    """Configuration through the TRACKING_CONFIGURATION variable (a services: variables entry)."""
    import realservers

    flavour, version = realservers.OPENSEARCH, "2.19.6"
    ok, reason = realservers.available(flavour, version)
    if not ok:
        pytest.skip("no real server: %s" % reason)
    server = realservers.start_server(flavour, version)
    try:
        port = free_port()
        env = dict(JOB_ENV, TRACKING_CONFIGURATION=json.dumps({"clients": [server.client_config()]}),
                   HEALTHCHECK_TCP_PORT=str(port))  # fmt: skip
        dry = podman("run", "--rm", "--network=host", *env_args(env), image, "--dry-run", "gradle", "8.0.0")
        planned = json.loads(dry.stdout)["requests"][0]
        service = Service(image, env, ["--service", "gradle", "8.0.0"])
        try:
            service.wait_for_log("delivered status=201")
            assert port_answers(port), "the service port does not answer"
            status, body = server.request("GET", "/%s/_doc/%s" % (planned["index"], planned["documentId"]))
            assert status == 200, body
            assert body["_source"]["template"] == {"name": "gradle", "version": "8.0.0"}
            assert body["_source"]["ci"]["job"]["id"] == int(JOB_ENV["CI_JOB_ID"])
            assert service.terminate() == 0
        finally:
            service.remove()
    finally:
        server.stop()


# ==== Precompiled modules


@pytest.mark.parametrize("command", [["--service", "maven", "4.1.0"], ["--dry-run", "maven", "4.1.0"],
                                     ["--check"]])
def test_the_probe_loads_every_python_module_from_a_precompiled_file(
    image: str, fresh: StandIn, command: list[str]
) -> None:
    """python -v logs "code object from <file>" for each module it loads from a source or .pyc file."""
    env = dict(JOB_ENV, HEALTHCHECK_TCP_PORT=str(free_port()))
    if command == ["--check"]:  # the TLS, authentication and privilege paths too
        clients = [{"url": fresh.url, "authentication": {"apiKey": "a2V5"}},
                   {"url": "https://127.0.0.1:%d" % free_port(), "skipSslVerification": True,
                    "authentication": {"username": "u", "password": "p"}, "timeout": 1}]
        env["TRACKING_CONFIGURATION"] = json.dumps({"clients": clients})
    service = Service(image, env, command, options=("--entrypoint", entrypoint(image, ("-v",))))
    try:
        if command[0] == "--service":
            wait_for_put(fresh)
            logs = service.wait_for_log("delivered status=201")
            assert service.terminate() == 0
        else:  # --check fails the dead https server: exit 1
            assert int(podman("wait", service.name).stdout.strip()) == (1 if command == ["--check"] else 0)
            logs = service.logs()
    finally:
        service.remove()
    loaded = [
        line.split(" from ", 1)[1].strip().strip("'")  # 3.13 quotes the path
        for line in logs.splitlines()
        if line.startswith("# code object from ")
    ]
    from_source = [path for path in loaded if not path.endswith(".pyc")]
    assert from_source == [], "compiled at start-up: %s" % from_source
    assert "/app/__pycache__/tracking.cpython-313.pyc" in loaded
    assert len(loaded) > 50


# ==== Measurements


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


def test_measure_start_up_with_and_without_precompiled_modules(image: str, fresh: StandIn, report) -> None:
    """Process start to exit of --dry-run inside the container, and container start to delivery."""
    entry = inspect(image)["Config"]["Entrypoint"]  # type: ignore[index]
    timer = (
        "import json, subprocess, sys, time\n"
        "samples = {}\n"
        "for name, extra, args in json.loads(sys.argv[1]):\n"
        "    times = samples.setdefault(name, [])\n"
        "    for _ in range(%d):\n"
        "        started = time.perf_counter()\n"
        "        subprocess.run([sys.executable, *extra, *args], stdout=subprocess.DEVNULL, check=True)\n"
        "        times.append(time.perf_counter() - started)\n"
        "print(json.dumps(samples))\n" % RUNS
    )
    plan = [
        ("interpreter alone (-I -c pass)", [], ["-I", "-c", "pass"]),
        ("--dry-run, precompiled", [], [*entry[1:], "--dry-run", "maven", "4.1.0"]),
        ("--dry-run, no .pyc", NO_PYC, [*entry[1:], "--dry-run", "maven", "4.1.0"]),
    ]
    proc = podman("run", "--rm", "--network=host", *env_args(JOB_ENV), "--entrypoint",
                  json.dumps([entry[0], "-I", "-c", timer, json.dumps(plan)]), image)  # fmt: skip
    in_container = {name: median_ms(times) for name, times in json.loads(proc.stdout).items()}

    delivered: dict[str, list[float]] = {"precompiled": [], "no .pyc": []}
    for _ in range(RUNS):
        for name, extra in (("precompiled", ()), ("no .pyc", NO_PYC)):
            reset(fresh)
            env = dict(JOB_ENV, HEALTHCHECK_TCP_PORT=str(free_port()))
            options = ("--entrypoint", entrypoint(image, extra)) if extra else ()
            service = Service(image, env, ["--service", "maven", "4.1.0"], options=options)
            try:
                _, arrived = wait_for_put(fresh)
                delivered[name].append(arrived - service.started)
            finally:
                service.remove()
    cold = {name: median_ms(times) for name, times in delivered.items()}
    report["median ms, process start to exit inside the container (%d runs)" % RUNS] = in_container
    report["median ms, podman run to document delivered (%d runs)" % RUNS] = cold
    assert in_container["--dry-run, precompiled"] < in_container["--dry-run, no .pyc"]
    assert cold["precompiled"] < cold["no .pyc"]


def test_measure_image_size(image: str, base: str, report) -> None:
    sizes = {}
    for name, tag in (("image", image), ("base (distroless equivalent)", base)):
        uncompressed = int(inspect(tag)["Size"])  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp, "image.tar")
            podman("save", "--format", "docker-archive", "-o", str(archive), tag, timeout=300)
            with open(archive, "rb") as source, gzip.open(Path(tmp, "image.tar.gz"), "wb", 6) as target:
                shutil.copyfileobj(source, target)
            compressed = Path(tmp, "image.tar.gz").stat().st_size
        sizes[name] = {
            "uncompressed MB": round(uncompressed / 1e6, 1),
            "podman save | gzip MB": round(compressed / 1e6, 1),
        }
    sizes["added by the Dockerfile, uncompressed MB"] = round(
        sizes["image"]["uncompressed MB"] - sizes["base (distroless equivalent)"]["uncompressed MB"], 1
    )
    report["sizes"] = sizes
    assert sizes["image"]["uncompressed MB"] < 100
