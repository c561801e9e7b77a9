"""Benchmark of tracking.py against loopback Elasticsearch stand-ins this script starts itself.

Usage: python bench/run.py [--runs N] [--quick] [--output FILE] [--json FILE]

Every figure is the median of whole-process runs. The variants of a comparison run interleaved,
in a shuffled order each round, so that drift on a noisy machine hits them alike; each is then
judged as a ratio measured in the same run. Absolute times are printed, never asserted.

1. time to delivered over HTTP and HTTPS (TLS verified against a test CA made with openssl):
   tracking.py vs bench/floor.py (one urllib PUT) vs curl. Target: probe <= 1.10 x floor.
2. fan-out to 1, 5 and 20 servers. Target: 5 servers <= 1.3 x one server.
3. a blackholed server (accepts, never answers) beside a healthy one, timeout T:
   total <= T + 0.5 s; the healthy document arrives in about the single-server time.
4. peak RSS of each variant (ru_maxrss of the child, forked from a small spawner process).
5. import cost: start-up ladder and `python -X importtime -c "import tracking"`.
6. inside the image (podman, set up as tests/imagebase.py does), with and without its .pyc files.

"Time to delivered" runs from the moment the spawner forks the child to the moment the loopback
server has read the whole document and answered 201 (CLOCK_MONOTONIC in both processes).

Exit status: 0 when the benchmark ran (targets met or not), 1 when a variant never delivered,
2 on a usage error.
"""

import argparse
import http.server
import json
import os
import platform
import random
import select
import shutil
import socket
import socketserver
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import floor  # noqa: E402  (shares build_document with the curl variant)

TEMPLATE = ("bench", "1.0.0")
BASE_ENV = {
    "CI_SERVER_URL": "https://gitlab.example.com",
    "CI_PROJECT_ID": "4242",
    "CI_PROJECT_URL": "https://gitlab.example.com/group/project",
    "CI_COMMIT_REF_NAME": "main",
    "CI_JOB_NAME": "build",
    "CI_JOB_STAGE": "build",
    "CI_PIPELINE_ID": "9000",
    "CI_PIPELINE_URL": "https://gitlab.example.com/group/project/-/pipelines/9000",
    "CI_RUNNER_ID": "7",
    "CI_RUNNER_DESCRIPTION": "bench runner",
    "CI_RUNNER_TAGS": '["docker", "linux"]',
    "CI_RUNNER_VERSION": "17.4.1",
    "GITLAB_USER_ID": "12",
    "GITLAB_USER_LOGIN": "bench",
}
FANOUT = (1, 5, 20)
PROBE_TARGET, FANOUT_TARGET, BLACKHOLE_SLACK = 1.10, 1.3, 0.5
IMPORT_BASELINE = "import json, urllib.request, ssl"
LABELS = {
    "probe": "`python tracking.py`",
    "probe-pyc": "probe imported from its .pyc",
    "floor": "floor",
    "curl": "curl",
}


STARTED = time.monotonic()


def log(message):
    print("bench: %5.1f s: %s" % (time.monotonic() - STARTED, message), file=sys.stderr, flush=True)


# ==== Test certificates (openssl CLI; the standard library cannot make them)


def make_certificates(directory):
    """A test CA and a server certificate for 127.0.0.1/localhost; None when openssl is missing."""
    if not shutil.which("openssl"):
        return None

    paths = {
        name: os.path.join(directory, name)
        for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "server.ext")
    }
    with open(paths["server.ext"], "w") as f:
        f.write(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n"
        )
    commands = (  # RSA 2048, as elasticsearch-certutil makes by default
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=tracking-bench-CA -keyout {ca.key} -out {ca.pem}"
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        " -addext subjectKeyIdentifier=hash",
        "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout {server.key} -out {server.csr}",
        "x509 -req -days 2 -in {server.csr} -CA {ca.pem} -CAkey {ca.key} -CAcreateserial"
        " -extfile {server.ext} -out {server.pem}",
    )
    for command in commands:
        argv = [paths.get(word[1:-1], word) if word.startswith("{") else word for word in command.split()]
        subprocess.run(["openssl", *argv], check=True, capture_output=True)
    return {"ca": paths["ca.pem"], "cert": paths["server.pem"], "key": paths["server.key"]}


# ==== Loopback servers


class Deliveries:
    """What every stand-in received: (server number, job id, monotonic time after the 201 went out)."""

    def __init__(self):
        self.condition = threading.Condition()
        self.records = []

    def add(self, server, job_id):
        now = time.monotonic()
        with self.condition:
            self.records.append((server, job_id, now))
            self.condition.notify_all()

    def wait_for(self, job_id, servers, timeout):
        """{server: time} for the servers that got the job's document, waiting up to timeout for all."""
        deadline = time.monotonic() + timeout
        with self.condition:
            while True:
                got = {s: t for s, j, t in self.records if j == job_id and s in servers}
                left = deadline - time.monotonic()
                if len(got) == len(servers) or left <= 0:
                    return got
                self.condition.wait(left)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    disable_nagle_algorithm = True  # as Elasticsearch (Netty) does: no 40 ms delayed-ACK stall on the body

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            job_id = json.loads(body)["ci"]["job"]["id"]
        except (ValueError, KeyError, TypeError):
            job_id = None
        answer = json.dumps({"_index": self.path.split("/")[1], "result": "created", "_version": 1}).encode()
        self.send_response(201 if job_id is not None else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        if job_id is not None and "/_create/" in self.path:
            self.server.deliveries.add(self.server.number, job_id)

    do_POST = do_PUT

    def do_GET(self):  # enough of Elasticsearch's root answer for anything that asks
        answer = b'{"version":{"number":"8.17.0"},"tagline":"You Know, for Search"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


class StandIn(http.server.ThreadingHTTPServer):
    """An Elasticsearch stand-in on 127.0.0.1, port 0; TLS is negotiated in the connection's thread."""

    def __init__(self, number, deliveries, tls):
        self.number, self.deliveries, self.tls = number, deliveries, tls
        super().__init__(("127.0.0.1", 0), Handler)

    def server_bind(self):  # skips HTTPServer's getfqdn() lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address):
        if self.tls:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        pass

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.server_port)


class Blackhole:
    """Accepts TCP connections and never answers (nor completes a TLS handshake)."""

    def __init__(self, scheme):
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = "%s://127.0.0.1:%d" % (scheme, self.socket.getsockname()[1])
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        for connection in self.held:
            connection.close()
        self.socket.close()


class Servers:
    """All stand-ins of one benchmark run, started once and reused by every run."""

    def __init__(self, certificates):
        self.deliveries = Deliveries()
        self.tls = None
        if certificates:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.load_cert_chain(certificates["cert"], certificates["key"])
        self.started = []

    def start(self, scheme, count):
        tls = self.tls if scheme == "https" else None
        servers = []
        for _ in range(count):
            server = StandIn(len(self.started), self.deliveries, tls)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.started.append(server)
            servers.append(server)
        return servers

    def close(self):
        stoppers = [threading.Thread(target=s.shutdown) for s in self.started]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self.started:
            server.server_close()


# ==== Spawning: a small process forks every run, so ru_maxrss is the child's own
#
# On Linux a process's ru_maxrss keeps the peak of the image it was exec'd from; a child started
# straight from this process (tens of MB of threads and TLS) would report our size, not its own.

SPAWNER = r"""
import json, os, sys, time
for line in sys.stdin:
    job = json.loads(line)
    out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(out, 1); os.dup2(err, 2)
            devnull = os.open(os.devnull, os.O_RDONLY); os.dup2(devnull, 0)
            os.chdir(job["cwd"])
            os.execve(job["argv"][0], job["argv"], job["env"])
        finally:
            os._exit(127)
    os.close(out); os.close(err)
    print(json.dumps({"pid": pid}), flush=True)
    _, status, usage = os.wait4(pid, 0)
    exited = time.monotonic()
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    print(json.dumps({"started": started, "exited": exited, "status": code,
                      "maxrss_kib": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
"""


class Spawner:
    def __init__(self, workdir):
        self.workdir = workdir
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", SPAWNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _read(self, timeout):
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return json.loads(self.process.stdout.readline()) if ready else None

    def run(self, argv, env, cwd=ROOT, timeout=60.0):
        """Runs argv to its end: {started, exited, status, maxrss_kib, cpu, stdout, stderr}."""
        out, err = os.path.join(self.workdir, "stdout"), os.path.join(self.workdir, "stderr")
        argv = [shutil.which(argv[0]) or argv[0], *argv[1:]]
        self.process.stdin.write(
            json.dumps({"argv": argv, "env": env, "cwd": cwd, "out": out, "err": err}) + "\n"
        )
        pid = self._read(10)["pid"]
        result = self._read(timeout)
        if result is None:
            os.kill(pid, 9)
            result = self._read(10)
            result["status"] = "killed after %gs" % timeout
        with open(out, errors="replace") as f:
            result["stdout"] = f.read()
        with open(err, errors="replace") as f:
            result["stderr"] = f.read()
        return result

    def close(self):
        self.process.stdin.close()
        self.process.wait()


# ==== Variants and runs


class Case:
    """One variant (probe, floor or curl) against a set of servers, run again every round."""

    def __init__(self, name, kind, servers, blackholes=(), timeout=5.0):
        self.name = name
        self.kind = kind  # probe, probe-pyc, floor, curl, image, image-nopyc
        self.servers = servers
        self.blackholes = blackholes
        self.timeout = timeout
        self.runs = []

    def ok_runs(self):
        return [r for r in self.runs if r["ok"]]

    def median(self, key):
        values = [r[key] for r in self.ok_runs() if r.get(key) is not None]
        return statistics.median(values) if values else None

    def maximum(self, key):
        values = [r[key] for r in self.ok_runs() if r.get(key) is not None]
        return max(values) if values else None

    def quartiles(self, key):
        values = sorted(r[key] for r in self.ok_runs() if r.get(key) is not None)
        if len(values) < 4:
            return (values[0], values[-1]) if values else (None, None)
        q = statistics.quantiles(values, n=4)
        return q[0], q[2]


class Bench:
    def __init__(self, options, workdir):
        self.options = options
        self.workdir = workdir
        self.python = options.python
        self.probe = options.probe
        self.certificates = None if options.no_tls else make_certificates(workdir)
        self.servers = Servers(self.certificates)
        self.spawner = Spawner(workdir)
        self.curl = shutil.which("curl")
        self.load_at_start = os.getloadavg()[0]  # other work on the machine: the noise to expect
        self.job_ids = iter(range(int(time.time()) * 1000, 1 << 62))

    def close(self):
        self.spawner.close()
        self.servers.close()

    def configuration(self, urls, timeout):
        clients = []
        for url in urls:
            client = {
                "url": url,
                "timeout": timeout,
                "esMajorVersion": 8,
                "indexPrefix": "tbc-",
                "authentication": {"username": "bench", "password": "bench-password"},
            }
            if url.startswith("https:"):
                client["caCertificate"] = self.certificates["ca"]
            clients.append(client)
        return {"clients": clients}

    def environment(self, case, job_id):
        urls = [s.url for s in case.servers] + [b.url for b in case.blackholes]
        env = dict(
            BASE_ENV,
            PATH=os.environ.get("PATH", "/usr/bin:/bin"),
            CI_JOB_ID=str(job_id),
            CI_JOB_URL="https://gitlab.example.com/group/project/-/jobs/%d" % job_id,
            TRACKING_CONFIGURATION=json.dumps(self.configuration(urls, case.timeout)),
            TRACKING_TEMPLATE_NAME=TEMPLATE[0],
            TRACKING_TEMPLATE_VERSION=TEMPLATE[1],
        )
        return env

    def command(self, case, env):
        if case.kind == "probe":
            return [self.python, self.probe, *TEMPLATE]
        if case.kind == "probe-pyc":  # as the image runs it: imported, so from its cached .pyc
            code = (
                "import sys; sys.path.insert(0, %r); import tracking; sys.exit(tracking.main())"
                % os.path.dirname(self.probe)
            )
            return [self.python, "-c", code, *TEMPLATE]
        if case.kind == "floor":
            return [self.python, os.path.join(BENCH, "floor.py"), *TEMPLATE]
        # curl sends the floor's document, written to a file before the clock starts
        now = time.time()
        body = os.path.join(self.workdir, "body.json")
        with open(body, "w") as f:
            json.dump(floor.build_document(env, TEMPLATE[0], TEMPLATE[1], now), f, separators=(",", ":"))
        path = "/tbc-ci-job-%s/_create/%s" % (
            time.strftime("%Y.%m", time.gmtime(now)),
            floor.document_id(env, TEMPLATE[0]),
        )
        argv = [self.curl, *"-sS -X PUT -u bench:bench-password --max-time".split(), str(case.timeout)]
        argv += ["-H", "Content-Type: application/json", "-H", "Accept: application/json"]
        argv += ["--data-binary", "@" + body]
        if any(s.url.startswith("https:") for s in case.servers):
            argv += ["--cacert", self.certificates["ca"], "--tlsv1.2"]
        if len(case.servers) > 1:
            argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(len(case.servers))]
        return argv + [s.url + path for s in case.servers]

    def run_once(self, case):
        job_id = next(self.job_ids)
        env = self.environment(case, job_id)
        result = self.spawner.run(self.command(case, env), env, timeout=case.timeout * 3 + 30)
        wanted = {s.number for s in case.servers}
        got = self.servers.deliveries.wait_for(job_id, wanted, timeout=1.0)
        run = {
            "exit": result["exited"] - result["started"],
            "status": result["status"],
            "rss_mib": result["maxrss_kib"] / 1024,
            "cpu": result["cpu"],
            "delivered": max(got.values()) - result["started"] if len(got) == len(wanted) else None,
            "stderr": result["stderr"][-2000:],
        }
        run["ok"] = run["delivered"] is not None and run["status"] == 0
        case.runs.append(run)
        return run

    def rounds(self, cases, rounds, warmup=1):
        """Runs every case once per round, in a new shuffled order each round."""
        order = random.Random(len(cases) * 7919 + rounds)  # noqa: S311 (an order, not a secret)
        for number in range(warmup + rounds):
            shuffled = list(cases)
            order.shuffle(shuffled)
            for case in shuffled:
                run = self.run_once(case)
                if number < warmup:
                    case.runs.pop()
                    if not run["ok"]:
                        log(
                            "%s: warm-up run failed (status %s): %s"
                            % (case.name, run["status"], run["stderr"])
                        )


# ==== Sections


def delivery_cases(bench):
    """Items 1, 2 and 4: HTTP and HTTPS single-server cases plus the HTTPS fan-out."""
    kinds = ["probe", "floor"] + (["curl"] if bench.curl else [])
    cases = {}
    schemes = ["http"] + (["https"] if bench.certificates else [])
    for scheme in schemes:
        sizes = FANOUT if scheme == schemes[-1] else (1,)
        for size in sizes:
            servers = bench.servers.start(scheme, size)
            for kind in kinds + (["probe-pyc"] if size == 1 else []):
                cases[(scheme, size, kind)] = Case("%s %s x%d" % (kind, scheme, size), kind, servers)
    return cases


def blackhole_cases(bench, scheme, timeout):
    """Item 3: the probe with a blackhole beside a healthy server, and the healthy one alone."""
    healthy = bench.servers.start(scheme, 1)
    blackhole = Blackhole(scheme)
    return (
        Case("probe %s + blackhole" % scheme, "probe", healthy, blackholes=[blackhole], timeout=timeout),
        Case("probe %s alone" % scheme, "probe", healthy, timeout=timeout),
        blackhole,
    )


def parse_importtime(text):
    """{module: (self_us, cumulative_us, parent)} from python -X importtime's stderr.

    The trace lists a module after everything it imported, indented one step deeper, so a
    module's parent is the next line one step less indented ("" at the top level).
    """
    entries = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        entries.append((name.strip(), int(own), int(cumulative), (len(name) - len(name.lstrip()) - 1) // 2))
    modules = {}
    for number, (name, own, cumulative, depth) in enumerate(entries):
        parent = next((e[0] for e in entries[number + 1 :] if e[3] < depth), "") if depth else ""
        modules[name] = (own, cumulative, parent)
    return modules


def import_costs(bench, rounds):
    """Item 5: start-up ladder (whole process) and -X importtime of `import tracking` vs the baseline."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    probe_dir = os.path.dirname(bench.probe)
    ladder = {
        "python -c pass": [bench.python, "-c", "pass"],
        'python -c "%s"' % IMPORT_BASELINE: [bench.python, "-c", IMPORT_BASELINE],
        'python -c "import tracking"': [bench.python, "-c", "import tracking"],
        "python tracking.py --dry-run": [bench.python, bench.probe, "--dry-run", *TEMPLATE],
    }
    dry_env = dict(
        env, CI_JOB_ID="1", TRACKING_CONFIGURATION=json.dumps(bench.configuration(["http://127.0.0.1:9"], 5))
    )
    times = {name: [] for name in ladder}
    codes = {"tracking": "import tracking", "baseline": IMPORT_BASELINE, "startup": "pass"}
    traces = {label: [] for label in codes}
    jobs = [("time", name, argv, dry_env) for name, argv in ladder.items()]
    jobs += [
        ("trace", label, [bench.python, "-X", "importtime", "-c", code], env) for label, code in codes.items()
    ]
    order = random.Random(rounds)  # noqa: S311 (an order, not a secret)
    for number in range(rounds + 1):  # round 0 warms up (and writes tracking's .pyc)
        order.shuffle(jobs)
        for kind, name, argv, job_env in jobs:
            result = bench.spawner.run(argv, job_env, cwd=probe_dir)
            if number and kind == "time" and result["status"] == 0:
                times[name].append(result["exited"] - result["started"])
            elif number and kind == "trace":
                traces[name].append(parse_importtime(result["stderr"]))
    timer = (  # in the children's interpreter: compile() time depends on the version
        "import statistics, sys, time\nsource = open(sys.argv[1], 'rb').read()\ntimes = []\n"
        "for _ in range(%d):\n    started = time.perf_counter()\n    compile(source, sys.argv[1], 'exec')\n"
        "    times.append(time.perf_counter() - started)\nprint(statistics.median(times))\n" % rounds
    )
    compiled = bench.spawner.run([bench.python, "-c", timer, bench.probe], env)
    compile_times = [float(compiled["stdout"])] if compiled["status"] == 0 else []
    return times, traces, statistics.median(compile_times) if compile_times else None


def summarise_imports(traces, top):
    """Median (cumulative, self, parent) per module that `import tracking` adds to a bare start-up."""

    def medians(runs):
        names = set().union(*runs) if runs else set()
        return {
            n: (
                statistics.median(r[n][1] for r in runs if n in r),
                statistics.median(r[n][0] for r in runs if n in r),
                next(r[n][2] for r in runs if n in r),
            )
            for n in names
        }

    startup = medians(traces["startup"])
    probe = {n: v for n, v in medians(traces["tracking"]).items() if n not in startup}
    baseline = {n: v for n, v in medians(traces["baseline"]).items() if n not in startup}

    def statement_cost(modules):  # what the -c statement imported at the top level
        return sum(v[0] for v in modules.values() if not v[2])

    rows = sorted(probe.items(), key=lambda item: -item[1][0])
    return {
        "tracking_cumulative_us": statement_cost(probe),
        "baseline_cumulative_us": statement_cost(baseline),
        "top": rows[:top],
        "extra": [(n, v) for n, v in rows if n not in baseline],
    }


NO_PYC = ["-B", "-X", "pycache_prefix=/nonexistent"]  # read no .pyc, write none (as tests/test_image.py)
IMAGE_TAG = "localhost/tracking-probe:bench"


def image_benchmark(bench, rounds):
    """Item 6: `podman run` to delivered inside the image, with and without its precompiled .pyc.

    Uses the image set-up of the image tests (tests/imagebase.py): its podman configuration and
    its local distroless-equivalent base, which must already be there (`python tests/imagebase.py`
    builds it; that downloads packages, so the benchmark never does). The probe image is built from
    the repository's Dockerfile without a baked configuration, which comes from the environment.
    The variant without .pyc inserts -B -X pycache_prefix=/nonexistent after the interpreter of the
    image's ENTRYPOINT, so every start compiles the probe and the standard library from source.
    """
    if bench.options.no_image:
        return "skipped: --no-image"
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import imagebase
    except ImportError as error:
        return "skipped: tests/imagebase.py not importable (%s)" % error
    reason = imagebase.missing_tools()
    if reason:
        return "skipped: " + reason
    if not bench.certificates:
        return "skipped: no test certificates (openssl missing or --no-tls)"
    env = imagebase.podman_env()
    base = imagebase.BASE_IMAGE
    if subprocess.run(["podman", "image", "exists", base], env=env, capture_output=True).returncode != 0:
        return "skipped: base image %s not built (`python tests/imagebase.py` builds it)" % base
    with tempfile.TemporaryDirectory(prefix="tracking-bench-context-") as context:
        shutil.copy(bench.probe, os.path.join(context, "tracking.py"))
        build = ["buildah", *"bud --format docker --isolation chroot --pull=false".split()]
        build += [
            "--build-arg",
            "BASE_IMAGE=" + base,
            "-f",
            os.path.join(ROOT, "Dockerfile"),
            "-t",
            IMAGE_TAG,
        ]
        built = subprocess.run([*build, context], env=env, capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        return "skipped: buildah bud failed: %s" % (built.stderr.strip().splitlines() or ["?"])[-1]
    inspected = subprocess.run(
        ["podman", "image", "inspect", IMAGE_TAG], env=env, capture_output=True, text=True
    )
    entrypoint = json.loads(inspected.stdout)[0]["Config"]["Entrypoint"]
    servers = bench.servers.start("https", 1)
    with open(bench.certificates["ca"]) as f:
        ca_pem = f.read()
    cases = [Case("image, precompiled", "image", servers), Case("image, no .pyc", "image-nopyc", servers)]
    order = random.Random(11)  # noqa: S311 (an order, not a secret)
    for number in range(rounds + 1):
        order.shuffle(cases)
        for case in cases:
            job_id = next(bench.job_ids)
            config = bench.configuration([servers[0].url], 10)
            config["clients"][0]["caCertificate"] = ca_pem  # inline PEM: nothing to mount
            variables = dict(BASE_ENV, CI_JOB_ID=str(job_id), TRACKING_CONFIGURATION=json.dumps(config))
            argv = ["podman", "run", "--rm", "--network=host"]
            for item in variables.items():
                argv += ["-e", "%s=%s" % item]
            if case.kind == "image-nopyc":
                argv += ["--entrypoint", json.dumps(entrypoint[:1] + NO_PYC + entrypoint[1:])]
            argv += [IMAGE_TAG, *TEMPLATE]  # a command: one delivery, then exit
            started = time.monotonic()
            process = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            exited = time.monotonic()
            got = bench.servers.deliveries.wait_for(job_id, {servers[0].number}, timeout=1.0)
            delivered = got[servers[0].number] - started if got else None
            if number:
                case.runs.append(
                    {
                        "ok": delivered is not None and process.returncode == 0,
                        "delivered": delivered,
                        "exit": exited - started,
                        "stderr": process.stderr[-2000:],
                    }
                )
    return cases


# ==== Report


def machine(bench):
    """CPU model, cores, kernel, Python, and the versions of curl and openssl that took part."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    parts = [
        model,
        "%d cores" % (os.cpu_count() or 0),
        "%s %s" % (platform.system(), platform.release()),
        "CPython %s"
        % subprocess.run(
            [bench.python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
    ]
    for tool, argv in (
        (bench.curl, [bench.curl, "--version"]),
        (shutil.which("openssl"), ["openssl", "version"]),
    ):
        if tool:
            parts.append(subprocess.run(argv, capture_output=True, text=True).stdout.split(" (")[0].strip())
    return ", ".join(parts)


def ms(seconds):
    return "\u2014" if seconds is None else "%.1f ms" % (seconds * 1000)


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt_ratio(value, unit="floor"):
    return "\u2014" if value is None else "%.2f \u00d7 %s" % (value, unit)


def verdict(ok):
    return "**met**" if ok else "**missed**"


def spread(case, key="delivered"):
    low, high = case.quartiles(key)
    if low is None:
        return "\u2014"
    return "%.1f\u2013%.1f" % (low * 1000, high * 1000)


def failures(case):
    bad = len(case.runs) - len(case.ok_runs())
    return "" if not bad else " (%d of %d runs failed)" % (bad, len(case.runs))


def report(bench, cases, blackhole, imports, image, started):
    options = bench.options
    rows = []
    targets = {}

    def row(item, figure, value, spread_text="", ratio_text="", target="", cpu=""):
        rows.append(
            "| %s | %s | %s | %s | %s | %s | %s |"
            % (item, figure, value, spread_text, ratio_text, cpu, target)
        )

    def cpu(case, reference):  # user + system time of the child: less swayed by other load than wall time
        value, base = case.median("cpu"), reference.median("cpu")
        return "" if value is None or not base else "%.0f ms (%.2f \u00d7)" % (value * 1000, value / base)

    kinds = ["probe", "floor"] + (["curl"] if bench.curl else [])
    schemes = sorted({scheme for scheme, _, _ in cases}, key=["http", "https"].index)
    for scheme in schemes:
        floor_case = cases[(scheme, 1, "floor")]
        base = floor_case.median("delivered")
        for kind in ["probe", "probe-pyc", *kinds[1:]]:
            case = cases[(scheme, 1, kind)]
            value = case.median("delivered")
            target = ""
            if kind == "probe":
                met = value is not None and base is not None and value <= PROBE_TARGET * base
                targets["1 %s" % scheme] = met
                target = "\u2264 %.2f \u00d7 floor: %s" % (PROBE_TARGET, verdict(met))
            row(
                "1",
                "%s, %s: delivered (exit)" % (scheme.upper(), LABELS[kind]),
                "%s (%s)%s" % (ms(value), ms(case.median("exit")), failures(case)),
                spread(case),
                fmt_ratio(ratio(value, base)),
                target,
                cpu(case, floor_case),
            )
    if not bench.curl:
        row("1", "curl", "skipped: curl is not installed")
    if not bench.certificates:
        row(
            "1",
            "HTTPS",
            "skipped: %s" % ("--no-tls" if options.no_tls else "openssl is not installed"),
        )
    fan_scheme = schemes[-1]
    for kind in kinds:
        one_case = cases[(fan_scheme, 1, kind)]
        one = one_case.median("delivered")
        for size in FANOUT[1:]:
            case = cases[(fan_scheme, size, kind)]
            value = case.median("delivered")
            target = ""
            if kind == "probe" and size == 5:
                met = value is not None and one is not None and value <= FANOUT_TARGET * one
                targets["2 fan-out"] = met
                target = "\u2264 %.1f \u00d7 1 server: %s" % (FANOUT_TARGET, verdict(met))
            row(
                "2",
                "%s fan-out, %s: %d servers, last delivered" % (fan_scheme.upper(), LABELS[kind], size),
                ms(value) + failures(case),
                spread(case),
                fmt_ratio(ratio(value, one), "1 server"),
                target,
                cpu(case, one_case),
            )
    bh_case, alone, timeout = blackhole
    total = bh_case.median("exit")
    worst = bh_case.maximum("exit")  # a bound holds for every run, not for the median
    single = alone.median("delivered")
    healthy = bh_case.median("delivered")
    met_total = worst is not None and worst <= timeout + BLACKHOLE_SLACK
    met_healthy = (
        healthy is not None and single is not None and healthy <= max(FANOUT_TARGET * single, single + 0.05)
    )
    targets["3 blackhole"] = met_total and met_healthy
    row(
        "3",
        "blackhole + healthy %s, timeout T = %g s: process exit (slowest)" % (fan_scheme.upper(), timeout),
        "%s (%s)" % (ms(total), ms(worst)) + failures(bh_case),
        spread(bh_case, "exit"),
        "T + %.2f s (T + %.2f s)" % (total - timeout, worst - timeout) if total and worst else "\u2014",
        "slowest \u2264 T + %.1f s: %s" % (BLACKHOLE_SLACK, verdict(met_total)),
    )
    row(
        "3",
        "blackhole + healthy: healthy server delivered",
        ms(healthy),
        spread(bh_case),
        fmt_ratio(ratio(healthy, single), "alone"),
        "about single-server time: %s" % verdict(met_healthy),
    )
    rss_base = cases[(fan_scheme, 1, "floor")].median("rss_mib")
    for kind in kinds:
        for size in (1, FANOUT[-1]):
            value = cases[(fan_scheme, size, kind)].median("rss_mib")
            row(
                "4",
                "peak RSS, %s, %s, %d server%s"
                % (LABELS[kind], fan_scheme.upper(), size, "s" if size > 1 else ""),
                "\u2014" if value is None else "%.1f MiB" % value,
                "",
                fmt_ratio(ratio(value, rss_base)),
            )
    times, traces, compile_time = imports
    summary = summarise_imports(traces, options.top)
    ladder_base = statistics.median(times['python -c "%s"' % IMPORT_BASELINE] or [0]) or None
    for name, values in times.items():
        value = statistics.median(values) if values else None
        row(
            "5",
            "start-up: `%s` (exit)" % name,
            ms(value) if values else "failed",
            "",
            fmt_ratio(ratio(value, ladder_base), "baseline imports"),
        )
    row(
        "5",
        "`-X importtime`: `import tracking`, beyond a bare start-up",
        ms(summary["tracking_cumulative_us"] / 1e6),
        "",
        fmt_ratio(
            ratio(summary["tracking_cumulative_us"], summary["baseline_cumulative_us"]), "baseline imports"
        ),
        "",
    )
    row(
        "5",
        "`-X importtime`: `%s`, beyond a bare start-up" % IMPORT_BASELINE,
        ms(summary["baseline_cumulative_us"] / 1e6),
    )
    row(
        "5",
        "compiling tracking.py (every `python tracking.py` pays it: no .pyc for a script)",
        ms(compile_time),
    )
    if isinstance(image, str):
        row("6", "image: cold start to delivered", image)
    else:
        base = next(c for c in image if c.kind == "image").median("delivered")
        for case in sorted(image, key=lambda c: c.kind):
            value = case.median("delivered")
            row(
                "6",
                "%s: `podman run` to delivered (exit)" % case.name,
                "%s (%s)%s" % (ms(value), ms(case.median("exit")), failures(case)),
                spread(case),
                fmt_ratio(ratio(value, base), "precompiled"),
            )

    lines = [
        "Machine: %s. Date: %s. Interpreter: `%s`. Load average at the start/end: %.1f/%.1f."
        % (
            machine(bench),
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            bench.interpreter_note,
            bench.load_at_start,
            os.getloadavg()[0],
        ),
        "Medians of %d interleaved rounds (%d for the blackhole, %d for imports); "
        "spread is the 25th\u201375th percentile in ms. Benchmark took %.0f s."
        % (options.runs, options.blackhole_runs, options.import_runs, time.monotonic() - started),
        "",
        "| # | figure | median | spread (ms) | ratio | CPU time (ratio) | target |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    lines += [
        "",
        'Import cost (`python -X importtime -c "import tracking"`, median of %d): the modules it adds '
        "to a bare start-up, by cumulative time; *new* = not imported by `%s` either."
        % (options.import_runs, IMPORT_BASELINE),
        "",
        "| module | imported by | cumulative | self | new |",
        "|---|---|---|---|---|",
    ]
    extra_names = {n for n, _ in summary["extra"]}
    for name, (cumulative, own, parent) in summary["top"]:
        lines.append(
            "| %s | %s | %.1f ms | %.1f ms | %s |"
            % (
                name,
                parent or "(the statement)",
                cumulative / 1000,
                own / 1000,
                "*new*" if name in extra_names else "",
            )
        )
    others = [(n, v) for n, v in summary["extra"] if n not in dict(summary["top"])]
    if others:
        lines.append(
            "| other new modules: %s | | | | |"
            % ", ".join("%s (%.1f ms)" % (n, v[0] / 1000) for n, v in others[:12])
        )
    return "\n".join(lines) + "\n", targets


# ==== Command line


def interpreter(options, workdir):
    """A fresh venv of --python (default: this interpreter): no site .pth files, which would import
    dozens of modules at every start; the interpreter itself where a venv cannot be made."""
    python = options.python or sys.executable
    venv = os.path.join(workdir, "venv")
    made = subprocess.run([python, "-m", "venv", "--without-pip", venv], capture_output=True)
    if made.returncode != 0 or not os.path.exists(os.path.join(venv, "bin", "python")):
        return python, "%s (no venv: %s)" % (python, made.stderr.decode(errors="replace").strip()[-200:])
    return os.path.join(venv, "bin", "python"), "%s in a fresh venv" % python


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    opt = parser.add_argument
    opt("--runs", type=int, default=21, help="interleaved rounds per figure (default: %(default)s)")
    opt("--quick", action="store_true", help="3 rounds, for a smoke test")
    opt(
        "--blackhole-timeout",
        type=float,
        default=1.0,
        help="client timeout T in seconds (default: %(default)s)",
    )
    opt(
        "--probe",
        default=os.path.join(ROOT, "tracking.py"),
        help="the probe to measure (default: %(default)s)",
    )
    opt(
        "--python",
        help="interpreter whose fresh venv runs the children (default: this one)",
    )
    opt(
        "--no-image",
        action="store_true",
        help="skip item 6 (default: run it where podman and the base image are)",
    )
    opt("--no-tls", action="store_true", help="skip HTTPS (default: HTTPS when openssl is installed)")
    opt("--top", type=int, default=15, help="rows of the import table (default: %(default)s)")
    opt("--output", help="also write the markdown to this file")
    opt("--json", help="write the raw figures to this file")
    options = parser.parse_args(argv)
    if options.quick:
        options.runs = min(options.runs, 3)
    if options.runs < 1:
        parser.error("--runs must be at least 1")
    options.blackhole_runs = max(1, min(options.runs, 5))
    options.import_runs = max(1, min(options.runs, 11))
    options.probe = os.path.abspath(options.probe)
    if not os.path.exists(options.probe):
        parser.error("no probe at %s" % options.probe)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tracking-bench-") as workdir:
        options.python, note = interpreter(options, workdir)
        bench = Bench(options, workdir)
        bench.interpreter_note = note
        blackhole = None
        try:
            cases = delivery_cases(bench)
            log("delivery: %d variants x %d rounds" % (len(cases), options.runs))
            bench.rounds(list(cases.values()), options.runs)
            scheme = "https" if bench.certificates else "http"
            bh_case, alone, blackhole = blackhole_cases(bench, scheme, options.blackhole_timeout)
            log("blackhole: %d rounds of T = %g s" % (options.blackhole_runs, options.blackhole_timeout))
            bench.rounds([bh_case, alone], options.blackhole_runs, warmup=0)
            log("imports: %d rounds" % options.import_runs)
            imports = import_costs(bench, options.import_runs)
            log("image")
            image = image_benchmark(bench, min(options.runs, 7))
            table, targets = report(
                bench, cases, (bh_case, alone, options.blackhole_timeout), imports, image, started
            )
        finally:
            if blackhole:
                blackhole.close()
            bench.close()
    print(table)
    if options.output:
        with open(options.output, "w") as f:
            f.write(table)
    every = [*cases.values(), bh_case, alone, *([] if isinstance(image, str) else image)]
    broken = [c for c in every if not c.ok_runs()]
    for case in broken:
        log(
            "%s never delivered; last stderr: %s" % (case.name, case.runs[-1]["stderr"] if case.runs else "-")
        )
    if options.json:
        raw = {c.name: [{k: v for k, v in r.items() if k != "stderr"} for r in c.runs] for c in every}
        with open(options.json, "w") as f:
            json.dump({"cases": raw, "targets": targets}, f, indent=1)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
