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
        # Through the security API (security on Elasticsearch 8 and 9):
        user, password = server.create_user({"indices": [...]})   # a role and its user
        server.create_api_key("probe", {...})   # encoded API key
        server.create_service_token()           # Bearer token of elastic/fleet-server (writes logs-*)
        status, body = server.request("GET", "/_cluster/health")   # admin auth by default
        server.client_config()   # a tracking.py "clients" entry pointing at this server
    finally:
        server.stop()                         # also done at interpreter exit

    # Several tests sharing servers, at most two JVMs running at once:
    pool = realservers.ServerPool(max_running=2)
    server = pool.get("opensearch", "2.19.6")
    pool.stop_all()

Proven versions (``MATRIX``): OpenSearch 1.3.20 and 2.19.6 (Java 17) and 3.8.0 (Java 21+),
Elasticsearch 6.8.23 and 7.17.29 (Java 17), 8.8.2 and 8.19.21 (Java 17) and 9.2.4 (Java 21+).
``python tests/realservers.py --prepare`` downloads and unpacks them all (a CI warm-up).
Elasticsearch zips include x-pack security (security=True, tls=True work on 8
and 9; on 7.17 security is switched off); the OpenSearch integ-test zips carry
no security plugin, so security/tls are refused for them.

Limits of the integ-test zips (they hold only a few modules):
- no analysis-common module, without which Elasticsearch cannot create its .security
  index (400 "Unknown filter type [pattern_capture]"): with security, a test-only plugin
  built from tests/esplugin/ (javac of the server's JDK against the zip's own lib/, then
  cached in the unpacked directory) registers the three components that index needs,
  so native users, roles, API keys and service tokens can be stored: the tests create
  them through the security API (only the bootstrap admin is written into the file realm);
- Elasticsearch 8.9 and later lack the rest-root module: GET / answers 405
  (8.8.2 is the newest 8.x zip that still answers it).

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
import hashlib
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
    (ELASTICSEARCH, "6.8.23"),
    (OPENSEARCH, "1.3.20"),
    (OPENSEARCH, "2.19.6"),
    (OPENSEARCH, "3.8.0"),
    (ELASTICSEARCH, "7.17.29"),
    (ELASTICSEARCH, "8.8.2"),  # the newest 8.x zip that still answers GET / (see below)
    (ELASTICSEARCH, "8.19.21"),
    (ELASTICSEARCH, "9.2.4"),
]

MAVEN_COORDINATES = {
    ELASTICSEARCH: "org.elasticsearch.distribution.integ-test-zip:elasticsearch",
    OPENSEARCH: "org.opensearch.distribution.integ-test-zip:opensearch",
}

ADMIN_USER = "tracking-admin"  # the one file-realm user: it creates the others
HEAP_OPTIONS = "-Xms512m -Xmx512m"
START_TIMEOUT = 180  # seconds; a cold JVM start on 2 busy cores takes 20-60 s
STOP_TIMEOUT = 20  # seconds between SIGTERM and SIGKILL
DOWNLOAD_TIMEOUT = 900
# A test-only plugin that gives the .security index the analysis components it needs (see
# install_security_analysis): installed into every secured Elasticsearch, so API keys work.
ANALYSIS_PLUGIN = "security-index-analysis"
ANALYSIS_PLUGIN_SOURCE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "esplugin", "SecurityIndexAnalysisPlugin.java"
)

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
    if (flavour == ELASTICSEARCH and major >= 9) or (flavour == OPENSEARCH and major >= 3):
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
    os.chmod(root, 0o755)  # noqa: S103 - the unprivileged server user reads the cache
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
        os.chmod(target, 0o755)  # noqa: S103 - as above
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


def install_security_analysis(install_dir, version, java_home):
    """Build tests/esplugin against this distribution's own jars and put it in plugins/, once.

    The .security index settings name analysis components of the analysis-common module
    (filter pattern_capture, tokenizer uax_url_email, filter unique), which the integ-test
    zip lacks: without them Elasticsearch cannot create that index, so no API key can be
    stored. javac of the server's own JDK, no download; about 2 s, then cached.
    """
    with open(ANALYSIS_PLUGIN_SOURCE, "rb") as source:
        digest = hashlib.sha256(source.read()).hexdigest()[:12]
    done_marker = os.path.join(install_dir, f".{ANALYSIS_PLUGIN}-{digest}")
    if os.path.exists(done_marker):
        return
    javac = os.path.join(java_home, "bin", "javac")
    if not os.access(javac, os.X_OK):
        raise ServerUnavailable(f"no javac in {java_home}: the test plugin needs a JDK, not a JRE")
    lowest, _ = _java_range(ELASTICSEARCH, version)
    root = cache_root()
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done_marker):
            return
        staging = tempfile.mkdtemp(prefix=f".{ANALYSIS_PLUGIN}-", dir=root)
        try:
            classes = os.path.join(staging, "classes")
            result = subprocess.run(
                [javac, "--release", str(lowest), "-cp", os.path.join(install_dir, "lib", "*"),
                 "-d", classes, ANALYSIS_PLUGIN_SOURCE],
                capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
            )
            if result.returncode != 0:
                raise RuntimeError(f"javac of {ANALYSIS_PLUGIN_SOURCE} failed:\n{result.stderr[-3000:]}")
            plugin = os.path.join(staging, ANALYSIS_PLUGIN)
            os.makedirs(plugin)
            with zipfile.ZipFile(os.path.join(plugin, f"{ANALYSIS_PLUGIN}.jar"), "w") as jar:
                for directory, _subdirectories, files in os.walk(classes):
                    for name in sorted(files):
                        path = os.path.join(directory, name)
                        jar.write(path, os.path.relpath(path, classes))
            with open(os.path.join(plugin, "plugin-descriptor.properties"), "w", encoding="utf-8") as out:
                out.write(f"name={ANALYSIS_PLUGIN}\n"
                          "description=Test only: analysis components of the .security index\n"
                          f"version={digest}\nclassname=tracking.testonly.SecurityIndexAnalysisPlugin\n"
                          f"java.version={lowest}\nelasticsearch.version={version}\n")
            os.chmod(plugin, 0o755)  # noqa: S103 - the unprivileged server user reads it
            for name in os.listdir(plugin):
                os.chmod(os.path.join(plugin, name), 0o644)
            target = os.path.join(install_dir, "plugins", ANALYSIS_PLUGIN)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(plugin, target)  # whole, never half-written, for a server starting now
            open(done_marker, "w").close()
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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
        self.leftovers = []  # launcher temp dirs to delete at stop

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

    def create_api_key(self, name, role_descriptors=None, timeout=60):
        """Create an API key as the admin; return its `encoded` value (`Authorization: ApiKey ...`).

        role_descriptors limits the key ({} or None: the admin's own privileges). The first
        key creates the .security index (a few seconds).
        """
        body = {"name": name, "role_descriptors": role_descriptors or {}}
        status, answer = self.request("POST", "/_security/api_key", body, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"could not create API key {name!r}: {status} {answer}")
        return answer["encoded"]

    def create_user(self, role_descriptor):
        """Create a role and a user holding only it, through the security API, as the admin.

        Returns (user, password). Names are fresh, so tests never share accounts."""
        name = "tracking-" + os.urandom(5).hex()
        password = "pw-" + os.urandom(9).hex()
        for path, body in ((f"/_security/role/{name}", role_descriptor),
                           (f"/_security/user/{name}", {"password": password, "roles": [name]})):
            status, answer = self.request("PUT", path, body, timeout=60)
            if status != 200:
                raise RuntimeError(f"PUT {path}: {status} {answer}")
        return name, password

    def create_service_token(self):
        """A Bearer token of the elastic/fleet-server service account (it may write logs-*)."""
        path = f"/_security/service/elastic/fleet-server/credential/token/t{os.urandom(5).hex()}"
        status, answer = self.request("POST", path, timeout=60)
        if status != 200:
            raise RuntimeError(f"POST {path}: {status} {answer}")
        return answer["token"]["value"]

    def client_config(self, **extra):
        """A tracking.py `clients` entry for this server (admin auth, CA when tls)."""
        client = {"url": self.url, "timeout": 10}
        if self.flavour == ELASTICSEARCH and _major(self.version) < 7:
            client["esMajorVersion"] = _major(self.version)  # typed URLs
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
        for leftover in self.leftovers:
            shutil.rmtree(leftover, ignore_errors=True)


def _signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)  # start_new_session made pid the group id
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all_running():
    for server in list(_RUNNING):
        server.stop()


def _stop_on_sigterm():
    """Make SIGTERM run the atexit cleanup (by default it ends Python without it).

    Servers run in their own session, so nothing else would stop them. Only
    installed when nobody else handles SIGTERM, and only from the main thread.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def exit_cleanly(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, exit_cleanly)


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
    if flavour == ELASTICSEARCH and (security or _major(version) >= 7):  # 6.x zips are oss: no x-pack
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
    for directory, _subdirectories, files in os.walk(path):
        os.chown(directory, uid, gid)
        for name in files:
            os.chown(os.path.join(directory, name), uid, gid)


def _pbkdf2_hash(secret):
    """A password hash in Elasticsearch's own {PBKDF2} format (10000 rounds of HMAC-SHA512).

    Written here, checked against `elasticsearch-users` output: saves a JVM start per user.
    """
    salt = os.urandom(32)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, 10000, 32)
    encode = base64.b64encode
    return f"{{PBKDF2}}10000${encode(salt).decode()}${encode(digest).decode()}"


def _create_file_realm(config_dir, admin_auth):
    """Write the admin (a superuser) into the file realm, before the start.

    Someone must exist before the security API can be called: this is the bootstrap
    account (what elasticsearch-reset-password gives a real cluster). Every other user,
    role, API key and token is created through the security API (Server.create_user...).
    """
    with open(os.path.join(config_dir, "users"), "a", encoding="utf-8") as users:
        users.write(f"{admin_auth[0]}:{_pbkdf2_hash(admin_auth[1])}\n")
    with open(os.path.join(config_dir, "users_roles"), "a", encoding="utf-8") as roles:
        roles.write(f"superuser:{admin_auth[0]}\n")


def start_server(flavour, version, security=False, tls=False, start_timeout=START_TIMEOUT, _attempt=1):
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
    if flavour == ELASTICSEARCH and security:
        install_security_analysis(install_dir, version, java_home)
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
        _create_file_realm(config_dir, admin_auth)
    _chown_tree(workdir, owner)  # last: the server writes its keystore and data in there

    arguments = [os.path.join(install_dir, "bin", flavour)]
    for key, value in _settings(flavour, version, port, workdir, security, tls).items():
        arguments += ["-E", f"{key}={value}"]
    log_path = os.path.join(workdir, "console.log")
    before = _launcher_leftovers()
    with open(log_path, "wb") as console:
        process = subprocess.Popen(
            arguments, env=environment, cwd=workdir, stdout=console, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, **user_kwargs,
        )
    scheme = "https" if tls else "http"
    server = Server(flavour, version, f"{scheme}://127.0.0.1:{port}", process, workdir,
                    ca_path, admin_auth, log_path)
    _RUNNING.append(server)
    _stop_on_sigterm()
    try:
        _wait_until_healthy(server, start_timeout)
        server.leftovers = sorted(_launcher_leftovers() - before)
    except BaseException:
        tail = server.log_tail()
        server.stop()
        if "BindException" in tail and _attempt < 3:
            # Someone took the free port between our probe and the server's bind: new port.
            return start_server(flavour, version, security, tls, start_timeout, _attempt + 1)
        raise RuntimeError(f"{flavour} {version} did not become healthy:\n{tail}") from None
    return server


def _launcher_leftovers():
    """The JVM-options launcher leaves a final-flags* dir in /tmp (it ignores ES_TMPDIR)."""
    root = tempfile.gettempdir()
    return {os.path.join(root, name) for name in os.listdir(root) if name.startswith("final-flags")}


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


if __name__ == "__main__":
    # python tests/realservers.py --prepare      fetch and unpack every MATRIX version
    # python tests/realservers.py elasticsearch 8.19.21 [security] [tls]   start, query, stop
    import sys

    if sys.argv[1:] == ["--prepare"]:
        results = [(flavour, version, *available(flavour, version)) for flavour, version in MATRIX]
        for flavour, version, ok, reason in results:
            print(f"{flavour} {version}: {'ready' if ok else reason}")
        sys.exit(0 if all(ok for _, _, ok, _ in results) else 1)
    flavour_arg, version_arg = sys.argv[1], sys.argv[2]
    started = time.monotonic()
    print("available:", available(flavour_arg, version_arg))
    demo = start_server(flavour_arg, version_arg, security="security" in sys.argv, tls="tls" in sys.argv)
    print(demo, f"healthy after {time.monotonic() - started:.1f}s")
    print(demo.request("GET", "/_cluster/health"))
    demo.stop()
    print("stopped; alive:", demo.running())
