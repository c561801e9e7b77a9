"""Real Elasticsearch and OpenSearch servers for integration tests.

Fetches an ``integ-test-zip`` distribution from Maven Central with ``mvn``,
unpacks it once into a cache outside the repository, and starts a single-node
server on 127.0.0.1 with a 512 MB heap. Nothing here imports pytest.

Usage::

    import realservers

    ok, reason = realservers.available("elasticsearch", "8.19.21")
    if not ok:
        ...                                   # skip (or fail in CI) with `reason`
    server = realservers.start_server("elasticsearch", "8.19.21", security=True, tls=True)
    try:
        server.url          # "https://127.0.0.1:PORT"
        server.flavour      # "elasticsearch" | "opensearch"
        server.version      # "8.19.21"
        server.ca_path      # PEM file of the CA that signed the HTTP cert (None without tls)
        server.admin_auth   # ("tracking-admin", "<password>") with security, else None
        status, body = server.request("GET", "/_cluster/health")   # admin auth by default
        server.client_config()   # a tracking.py "clients" entry pointing at this server
    finally:
        server.stop()                         # also done at interpreter exit

    # Several tests sharing servers, at most two JVMs running at once:
    pool = realservers.ServerPool(max_running=2)
    server = pool.get("opensearch", "2.19.6")
    pool.stop_all()

Proven versions (``MATRIX``): OpenSearch 2.19.6 (Java 17) and 3.8.0 (Java 21+),
Elasticsearch 7.17.29 (Java 17), 8.19.21 (Java 17) and 9.2.4 (Java 21+).
Elasticsearch zips include x-pack security (security=True, tls=True work on 8
and 9; on 7.17 security is switched off); the OpenSearch integ-test zips carry
no security plugin, so security/tls are refused for them.

Environment:
    TRACKING_SERVERS_CACHE   where distributions are unpacked (default
                             ``$XDG_CACHE_HOME/tracking-probe/servers``, or
                             ``/var/cache/tracking-probe/servers`` as root,
                             because the server user cannot enter /root)
    TRACKING_MAVEN_REPO      Maven local repository (default ~/.m2/repository)
    TRACKING_JAVA_HOMES      extra JDK directories, separated by ":"; /usr/lib/jvm/*
                             and $JAVA_HOME are searched too
    TRACKING_SERVER_USER     user that runs servers when we are root (default tracking-es)
    TRACKING_KEEP_SERVER_DIRS=1   keep each server's temp dir (data, logs) after stop

Only loopback traffic: every server binds 127.0.0.1.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

# ==== Constants

ELASTICSEARCH = "elasticsearch"
OPENSEARCH = "opensearch"

# Newest patch of each line that both resolved on Maven Central and started here.
MATRIX = [
    (OPENSEARCH, "2.19.6"),
    (OPENSEARCH, "3.8.0"),
    (ELASTICSEARCH, "7.17.29"),
    (ELASTICSEARCH, "8.19.21"),
    (ELASTICSEARCH, "9.2.4"),
]

MAVEN_COORDINATES = {
    ELASTICSEARCH: "org.elasticsearch.distribution.integ-test-zip:elasticsearch",
    OPENSEARCH: "org.opensearch.distribution.integ-test-zip:opensearch",
}

ADMIN_USER = "tracking-admin"
HEAP_OPTIONS = "-Xms512m -Xmx512m"
START_TIMEOUT = 180  # seconds; a cold JVM start on 2 busy cores takes 20-60 s
STOP_TIMEOUT = 20  # seconds between SIGTERM and SIGKILL
DOWNLOAD_TIMEOUT = 900

_RUNNING = []  # servers to stop at interpreter exit, even when a test crashed


# ==== Helpers


def _major(version):
    return int(version.split(".")[0])


def _java_range(flavour, version):
    """Return (lowest, highest) Java feature release this server line runs on.

    7.17, 8.x and OpenSearch 2.x still use the SecurityManager, removed in
    Java 24, so they get a JDK from 17 to 23; 9.x and OpenSearch 3.x need 21+.
    """
    major = _major(version)
    if flavour == ELASTICSEARCH and major >= 9 or flavour == OPENSEARCH and major >= 3:
        return 21, 99
    return 17, 23


def cache_root():
    configured = os.environ.get("TRACKING_SERVERS_CACHE")
    if configured:
        return configured
    if os.geteuid() == 0:
        # /root is usually mode 700: the unprivileged server user could not read it.
        return "/var/cache/tracking-probe/servers"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "tracking-probe", "servers")


def maven_repository():
    return os.environ.get("TRACKING_MAVEN_REPO") or os.path.expanduser("~/.m2/repository")


def _jdk_feature_version(java_home):
    """Read the feature release (17, 25, ...) from the JDK's `release` file."""
    try:
        with open(os.path.join(java_home, "release"), encoding="utf-8") as release:
            text = release.read()
    except OSError:
        return None
    match = re.search(r'^JAVA_VERSION="(\d+)', text, re.MULTILINE)
    if not match or not os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return None
    return int(match.group(1))


def _candidate_java_homes():
    homes = [h for h in os.environ.get("TRACKING_JAVA_HOMES", "").split(":") if h]
    if os.environ.get("JAVA_HOME"):
        homes.append(os.environ["JAVA_HOME"])
    if os.path.isdir("/usr/lib/jvm"):
        homes += sorted(os.path.join("/usr/lib/jvm", name) for name in os.listdir("/usr/lib/jvm"))
    seen = []
    for home in homes:
        real = os.path.realpath(home)
        if real not in seen:
            seen.append(real)
    return seen


def find_java_home(flavour, version):
    """Return a JDK directory for this server line, or None (lowest fitting release wins)."""
    lowest, highest = _java_range(flavour, version)
    fitting = []
    for home in _candidate_java_homes():
        feature = _jdk_feature_version(home)
        if feature is not None and lowest <= feature <= highest:
            fitting.append((feature, home))
    return min(fitting)[1] if fitting else None


def free_port():
    """Ask the OS for a free loopback port (tiny race with other processes; accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerUnavailable(Exception):
    """Java, Maven or the distribution is missing: the caller skips (or fails in CI)."""


# ==== Fetching and unpacking


def distribution_zip(flavour, version):
    group, artifact = MAVEN_COORDINATES[flavour].split(":")
    return os.path.join(
        maven_repository(), *group.split("."), artifact, version, f"{artifact}-{version}.zip"
    )


def fetch(flavour, version):
    """Download the zip into the Maven repository unless it is already there."""
    path = distribution_zip(flavour, version)
    if os.path.exists(path):
        return path
    if not shutil.which("mvn"):
        raise ServerUnavailable("mvn not found (apt-get install maven)")
    command = [
        "mvn", "-B", "-q", "dependency:get", "-Dtransitive=false",
        f"-Dmaven.repo.local={maven_repository()}",
        f"-Dartifact={MAVEN_COORDINATES[flavour]}:{version}:zip",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise ServerUnavailable(f"mvn download of {flavour} {version} timed out") from None
    if result.returncode != 0 or not os.path.exists(path):
        errors = [line for line in result.stdout.splitlines() if "ERROR" in line]
        detail = errors[0][:200] if errors else f"exit {result.returncode}"
        raise ServerUnavailable(f"mvn could not fetch {flavour} {version}: {detail}")
    return path


def install(flavour, version):
    """Return the unpacked distribution directory, unpacking it once per cache."""
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    target = os.path.join(root, f"{flavour}-{version}")
    done_marker = os.path.join(target, ".unpacked")
    if os.path.exists(done_marker):
        return target
    archive = fetch(flavour, version)
    # A lock, so two test processes never unpack into the same place at once.
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done_marker):
            return target
        staging = tempfile.mkdtemp(prefix=f".{flavour}-{version}-", dir=root)
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                extracted = bundle.extract(member, staging)
                # zipfile drops Unix modes: restore them (bin/ scripts must stay executable).
                mode = (member.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(extracted, mode | 0o444 | (0o111 if member.is_dir() else 0))
        (top,) = os.listdir(staging)  # the zip holds one directory, <artifact>-<version>
        shutil.rmtree(target, ignore_errors=True)
        os.rename(os.path.join(staging, top), target)
        os.rmdir(staging)
        os.chmod(target, 0o755)
        open(done_marker, "w").close()
    return target


def available(flavour=ELASTICSEARCH, version="8.19.21"):
    """Return (True, "") when this server can be started here, else (False, reason).

    Downloads and unpacks the distribution if needed, so a True answer means
    only the start itself remains to go wrong.
    """
    if (flavour, version) not in MATRIX and flavour not in MAVEN_COORDINATES:
        return False, f"unknown flavour {flavour!r}"
    if find_java_home(flavour, version) is None:
        lowest, highest = _java_range(flavour, version)
        return False, f"no JDK {lowest}..{highest} found for {flavour} {version} (set TRACKING_JAVA_HOMES)"
    try:
        install(flavour, version)
    except ServerUnavailable as error:
        return False, str(error)
    except (OSError, zipfile.BadZipFile) as error:
        return False, f"could not unpack {flavour} {version}: {error}"
    return True, ""


# ==== Users, certificates


def server_user():
    """Return (uid, gid) to run servers as, creating a system user when we are root.

    Elasticsearch and OpenSearch refuse to run as root, and CI runs as root.
    """
    if os.geteuid() != 0:
        return None
    name = os.environ.get("TRACKING_SERVER_USER", "tracking-es")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def make_certificates(directory):
    """Write ca.pem, http.pem (SAN 127.0.0.1, localhost) and http.key with openssl.

    Returns the CA path. Generated per server so no key ever lives in the repository.
    """
    def openssl(*arguments):
        subprocess.run(["openssl", *arguments], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=tracking-probe test CA", "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "http.key", "-out", "http.csr")
    with open(os.path.join(directory, "http.ext"), "w") as extensions:
        extensions.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                         "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "http.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "http.ext", "-out", "http.pem")
    return os.path.join(directory, "ca.pem")


# ==== The server


class Server:
    """One running server. Create with start_server(); stop with .stop()."""

    def __init__(self, flavour, version, url, process, workdir, ca_path, admin_auth, log_path):
        self.flavour = flavour
        self.version = version
        self.url = url
        self.process = process
        self.workdir = workdir
        self.ca_path = ca_path
        self.admin_auth = admin_auth
        self.log_path = log_path
        self.security = admin_auth is not None
        self.tls = ca_path is not None

    def __repr__(self):
        return f"<Server {self.flavour} {self.version} {self.url}>"

    def ssl_context(self):
        return ssl.create_default_context(cafile=self.ca_path) if self.ca_path else None

    def request(self, method, path, body=None, auth="admin", headers=None, timeout=30):
        """Send one request; return (status, body) with body parsed as JSON when it is.

        auth: "admin" (default; nothing when security is off), None, a
        (user, password) tuple, or a full Authorization header value string.
        A non-2xx status is returned, not raised.
        """
        data = None
        all_headers = dict(headers or {})
        if body is not None:
            is_text = isinstance(body, (str, bytes))
            data = body if isinstance(body, bytes) else (body if is_text else json.dumps(body)).encode()
            all_headers.setdefault("Content-Type", "application/json")
        if auth == "admin":
            auth = self.admin_auth
        if isinstance(auth, tuple):
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            all_headers["Authorization"] = f"Basic {token}"
        elif isinstance(auth, str):
            all_headers["Authorization"] = auth
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
        # No proxy: these servers live on loopback, whatever the shell exports.
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.ssl_context())
        )
        try:
            with opener.open(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def client_config(self, **extra):
        """A tracking.py `clients` entry for this server (admin auth, CA when tls)."""
        client = {"url": self.url, "timeout": 10}
        if self.admin_auth:
            client["authentication"] = {"username": self.admin_auth[0], "password": self.admin_auth[1]}
        if self.ca_path:
            client["caCertificate"] = self.ca_path
        client.update(extra)
        return client

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""

    def running(self):
        return self.process.poll() is None

    def stop(self):
        """Stop the whole process group: SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT)
        # The launcher may exit before its JVM child: sweep the group once more.
        _signal_group(self.process, signal.SIGKILL)
        if self in _RUNNING:
            _RUNNING.remove(self)
        if not os.environ.get("TRACKING_KEEP_SERVER_DIRS"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def _signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)  # start_new_session made pid the group id
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all_running():
    for server in list(_RUNNING):
        server.stop()


def _settings(flavour, version, port, workdir, security, tls):
    settings = {
        "cluster.name": "tracking-probe-test",
        "node.name": "node-1",
        "network.host": "127.0.0.1",
        "http.port": str(port),
        "discovery.type": "single-node",
        "path.data": os.path.join(workdir, "data"),
        "path.logs": os.path.join(workdir, "logs"),
        # A shared CI disk may be nearly full; we never want read-only indices for that.
        "cluster.routing.allocation.disk.threshold_enabled": "false",
    }
    if flavour == ELASTICSEARCH:
        settings["xpack.security.enabled"] = "true" if security else "false"
        if tls:
            settings.update({
                "xpack.security.http.ssl.enabled": "true",
                "xpack.security.http.ssl.key": "http.key",  # paths relative to the config dir
                "xpack.security.http.ssl.certificate": "http.pem",
                "xpack.security.http.ssl.certificate_authorities": "ca.pem",
            })
    return settings


def _prepare_config(install_dir, config_dir, workdir):
    """Copy config/ into the temp dir so each server owns its keystore, users and certs."""
    shutil.copytree(os.path.join(install_dir, "config"), config_dir)
    options_path = os.path.join(config_dir, "jvm.options")
    with open(options_path, encoding="utf-8") as options:
        lines = options.read().splitlines()
    kept = []
    for line in lines:
        if "-Xlog:gc" in line or "-Xloggc" in line:
            continue  # GC logs would go to relative paths; we do not need them
        line = line.replace("HeapDumpPath=data", f"HeapDumpPath={workdir}/data")
        line = line.replace("ErrorFile=logs/", f"ErrorFile={workdir}/logs/")
        kept.append(line)
    with open(options_path, "w", encoding="utf-8") as options:
        options.write("\n".join(kept) + "\n")


def _chown_tree(path, owner):
    if owner is None:
        return
    uid, gid = owner
    for directory, subdirectories, files in os.walk(path):
        os.chown(directory, uid, gid)
        for name in files:
            os.chown(os.path.join(directory, name), uid, gid)


def start_server(flavour, version, security=False, tls=False, start_timeout=START_TIMEOUT):
    """Start a single-node server on a free 127.0.0.1 port and wait until it is healthy.

    Raises ServerUnavailable when Java/Maven/the distribution is missing, and
    RuntimeError (with the server log's tail) when it does not become healthy.
    """
    if flavour == OPENSEARCH and (security or tls):
        raise ValueError("the OpenSearch integ-test zip has no security plugin: no security/tls")
    if flavour == ELASTICSEARCH and _major(version) < 8 and (security or tls):
        raise ValueError("security/tls are proven on Elasticsearch 8 and 9 only")
    ok, reason = available(flavour, version)
    if not ok:
        raise ServerUnavailable(reason)
    install_dir = install(flavour, version)
    java_home = find_java_home(flavour, version)
    owner = server_user()

    workdir = tempfile.mkdtemp(prefix=f"tracking-{flavour}-{version}-")
    config_dir = os.path.join(workdir, "config")
    os.makedirs(os.path.join(workdir, "data"))
    os.makedirs(os.path.join(workdir, "logs"))
    os.makedirs(os.path.join(workdir, "tmp"))
    _prepare_config(install_dir, config_dir, workdir)
    port = free_port()
    prefix = "ES" if flavour == ELASTICSEARCH else "OPENSEARCH"
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "JAVA_HOME": java_home,
        f"{prefix}_JAVA_HOME": java_home,
        f"{prefix}_PATH_CONF": config_dir,
        f"{prefix}_JAVA_OPTS": HEAP_OPTIONS,
        f"{prefix}_TMPDIR": os.path.join(workdir, "tmp"),
        "LANG": "C.UTF-8",
    }
    user_kwargs = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}

    ca_path = None
    if tls:
        ca_path = make_certificates(config_dir)
    admin_auth = None
    if security:
        admin_auth = (ADMIN_USER, "admin-" + os.urandom(9).hex())
    _chown_tree(workdir, owner)
    if owner:
        os.chmod(workdir, 0o750)
        os.chown(workdir, owner[0], 0)  # root's group: the test process (root) may read logs

    if admin_auth:
        # File realm user, written offline: no bootstrap password dance at startup.
        subprocess.run(
            [os.path.join(install_dir, "bin", "elasticsearch-users"), "useradd", admin_auth[0],
             "-p", admin_auth[1], "-r", "superuser"],
            env=environment, cwd=workdir, check=True, capture_output=True, timeout=120,
            stdin=subprocess.DEVNULL, **user_kwargs,
        )

    arguments = [os.path.join(install_dir, "bin", flavour)]
    for key, value in _settings(flavour, version, port, workdir, security, tls).items():
        arguments += ["-E", f"{key}={value}"]
    log_path = os.path.join(workdir, "console.log")
    with open(log_path, "wb") as console:
        process = subprocess.Popen(
            arguments, env=environment, cwd=workdir, stdout=console, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, **user_kwargs,
        )
    scheme = "https" if tls else "http"
    server = Server(flavour, version, f"{scheme}://127.0.0.1:{port}", process, workdir,
                    ca_path, admin_auth, log_path)
    _RUNNING.append(server)
    try:
        _wait_until_healthy(server, start_timeout)
    except BaseException:
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"{flavour} {version} did not become healthy:\n{tail}") from None
    return server


def _wait_until_healthy(server, timeout):
    """Poll GET /_cluster/health until yellow or green, within a deadline."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"exited with {server.process.returncode}")
        try:
            status, body = server.request("GET", "/_cluster/health", timeout=5)
            if status == 200 and isinstance(body, dict) and body.get("status") in ("yellow", "green"):
                return
            last = f"{status} {body}"
        except (OSError, ssl.SSLError) as error:
            last = str(error)
        time.sleep(0.5)
    raise TimeoutError(f"not healthy within {timeout}s: {last}")


# ==== Sharing servers between tests


class ServerPool:
    """Keep servers running between tests, at most `max_running` JVMs at once.

    get() returns the running server for a (flavour, version, security, tls)
    key or starts one, first stopping the least recently used when full.
    """

    def __init__(self, max_running=2):
        self.max_running = max_running
        self._servers = {}  # key -> Server, in least-recently-used order

    def get(self, flavour, version, security=False, tls=False, keep=()):
        """keep: servers that must not be stopped to make room (e.g. one in use)."""
        key = (flavour, version, security, tls)
        server = self._servers.pop(key, None)
        if server is not None and not server.running():
            server.stop()
            server = None
        if server is None:
            for old_key in list(self._servers):
                if len(self._servers) < self.max_running:
                    break
                if self._servers[old_key] not in keep:
                    self._servers.pop(old_key).stop()
            server = start_server(flavour, version, security=security, tls=tls)
        self._servers[key] = server
        return server

    def stop_all(self):
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


if __name__ == "__main__":  # manual smoke test: python tests/realservers.py elasticsearch 8.19.21 [security] [tls]
    import sys

    flavour_arg, version_arg = sys.argv[1], sys.argv[2]
    started = time.monotonic()
    print("available:", available(flavour_arg, version_arg))
    demo = start_server(flavour_arg, version_arg, security="security" in sys.argv, tls="tls" in sys.argv)
    print(demo, f"healthy after {time.monotonic() - started:.1f}s")
    print(demo.request("GET", "/"))
    demo.stop()
    print("stopped; alive:", demo.running())
