"""Service mode: listen first, deliver, stay alive for the health check, stop at once on SIGTERM."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import TRACKING, _outputs, probe_env, unused_port, write_config

import tracking


class Service:
    """tracking.py --service in the background, its stderr read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, TRACKING, "--service", *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for_line(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError("no line with %r in %r" % (text, self.seen))

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Send the signal; return the exit code and how long the exit took."""
        started = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout=10)
        elapsed = time.monotonic() - started
        self.process.stdout.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        _outputs.extend(self.seen)
        return code, elapsed

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def services():
    started: list[Service] = []

    def start(*args: str, env: dict[str, str]) -> Service:
        started.append(Service(*args, env=env))
        return started[-1]

    yield start
    for service in started:
        service.kill()


def port_answers(port: int, timeout: float = 5) -> bool:
    """True once a TCP connection to the port succeeds (as the runner's health check dials)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            threading.Event().wait(0.02)  # the process is still starting
    return False


def test_port_opens_before_delivery_and_stays_open_until_sigterm(services, standin, tmp_path):
    standin.gate = threading.Event()  # hold the answer: delivery is under way
    port = unused_port()
    config = write_config(tmp_path, {"url": standin.url})
    service = services("maven", "3.9.0", "--config", config, env=probe_env(TRACKING_SERVICE_PORT=str(port)))
    assert standin.wait_for_requests(1)
    assert port_answers(port)  # while the document is still on its way
    standin.gate.set()
    service.wait_for_line("delivered status=201")
    assert len(standin.documents) == 1
    assert port_answers(port)  # alive after delivery
    assert service.process.poll() is None
    code, elapsed = service.stop(signal.SIGTERM)
    assert code == 0
    assert elapsed < 1.0


def test_sigint_also_stops_it_with_exit_0(services, standin, tmp_path):
    port = unused_port()
    config = write_config(tmp_path, {"url": standin.url})
    service = services("maven", "1", "--config", config, env=probe_env(TRACKING_SERVICE_PORT=str(port)))
    service.wait_for_line("delivered")
    code, elapsed = service.stop(signal.SIGINT)
    assert code == 0 and elapsed < 1.0


def test_sigterm_during_delivery_exits_at_once(services, blackhole, tmp_path):
    port = unused_port()
    config = write_config(tmp_path, {"url": blackhole.url, "timeout": 30})
    service = services("maven", "1", "--config", config, env=probe_env(TRACKING_SERVICE_PORT=str(port)))
    assert port_answers(port)
    code, elapsed = service.stop()
    assert code == 0 and elapsed < 1.0


def test_healthcheck_tcp_port_wins(services, standin, tmp_path):
    wanted, other = unused_port(), unused_port()
    env = probe_env(HEALTHCHECK_TCP_PORT=str(wanted), TRACKING_SERVICE_PORT=str(other))
    service = services("maven", "1", "--config", write_config(tmp_path, {"url": standin.url}), env=env)
    assert port_answers(wanted)
    service.wait_for_line("delivered")
    assert not port_answers(other, timeout=0.2)
    assert service.stop()[0] == 0


def test_default_port(services, standin, tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", tracking.DEFAULT_SERVICE_PORT)) == 0:
            pytest.fail("port %d is busy on this machine" % tracking.DEFAULT_SERVICE_PORT)
    service = services("maven", "1", "--config", write_config(tmp_path, {"url": standin.url}),
                       env=probe_env())
    assert port_answers(tracking.DEFAULT_SERVICE_PORT)
    assert service.stop()[0] == 0


def test_a_taken_port_is_one_log_line_and_tracking_goes_on(services, standin, tmp_path):
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_config(tmp_path, {"url": standin.url})
        service = services("maven", "1", "--config", config, env=probe_env(TRACKING_SERVICE_PORT=str(port)))
        line = service.wait_for_line("port %d unavailable" % port)
        assert line.strip() == ("tracking: port %d unavailable (Address already in use): health check "
                                "not answered, tracking goes on" % port)
        service.wait_for_line("delivered status=201")
        assert len(standin.documents) == 1
        assert service.stop()[0] == 0


def test_template_from_variables_alone(services, standin, tmp_path):
    """Kubernetes runners may drop the service command: the image's CMD is just --service."""
    env = probe_env(TRACKING_SERVICE_PORT=str(unused_port()), TRACKING_TEMPLATE_NAME="gradle",
                    TRACKING_TEMPLATE_VERSION="2.0.0",
                    TRACKING_CONFIGURATION=write_config(tmp_path, {"url": standin.url}))
    service = services(env=env)
    service.wait_for_line("delivered")
    assert standin.puts()[0].json()["template"] == {"name": "gradle", "version": "2.0.0"}
    assert service.stop()[0] == 0


def test_disabled_service_still_listens_and_idles(services, standin, tmp_path):
    port = unused_port()
    env = probe_env(TRACKING_SERVICE_PORT=str(port), TRACKING_DISABLED="true")
    service = services("maven", "1", "--config", write_config(tmp_path, {"url": standin.url}), env=env)
    service.wait_for_line("disabled")
    assert port_answers(port)
    assert standin.requests == []
    assert service.stop()[0] == 0


def test_configuration_error_in_service_mode_is_logged_and_never_stops_the_job(services, tmp_path):
    port = unused_port()
    config = write_config(tmp_path, {"url": "http://h", "timeout": "5s"})
    service = services("maven", "1", "--config", config, env=probe_env(TRACKING_SERVICE_PORT=str(port)))
    service.wait_for_line('clients[0].timeout: expected a number, got "5s"')
    assert port_answers(port)
    assert service.stop()[0] == 0


def test_a_port_variable_that_is_not_a_port_is_warned_and_the_next_one_used(services, standin, tmp_path):
    port = unused_port()
    env = probe_env(HEALTHCHECK_TCP_PORT="http", TRACKING_SERVICE_PORT=str(port))
    service = services("maven", "1", "--config", write_config(tmp_path, {"url": standin.url}), env=env)
    service.wait_for_line('$HEALTHCHECK_TCP_PORT="http" is not a TCP port')
    assert port_answers(port)
    assert service.stop()[0] == 0


@pytest.mark.parametrize("args", [("maven",), ("maven", "1", "--option-of-a-newer-template")])
def test_a_usage_error_in_service_mode_is_logged_and_the_service_idles(services, standin, args):
    port = unused_port()
    service = services(*args, env=probe_env(TRACKING_SERVICE_PORT=str(port)))
    service.wait_for_line("usage error:")
    assert port_answers(port)  # the runner's health check still passes
    assert service.process.poll() is None
    assert service.stop()[0] == 0


def test_a_service_without_any_template_logs_a_usage_error_and_idles(services):
    port = unused_port()
    service = services(env=probe_env(TRACKING_SERVICE_PORT=str(port)))
    service.wait_for_line("usage error: missing TEMPLATE_NAME TEMPLATE_VERSION")
    assert port_answers(port)
    assert service.stop()[0] == 0
