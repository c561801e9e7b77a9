"""Start-up cost: the probe loads only what a run needs (see STYLE: import cost)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, TRACKING, probe_env

HEAVY = {"logging", "dataclasses", "concurrent.futures", "concurrent", "http.server", "typing",
         "uuid", "asyncio", "socketserver", "subprocess", "argparse", "queue"}


def imported_modules(*args: str) -> set[str]:
    """Every module a run imports, from -X importtime (-S: the test machine's site .pth
    files import modules of their own)."""
    result = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", *args], cwd=str(ROOT),
                            env=probe_env(), capture_output=True, text=True, timeout=30, check=False)
    return {line.split("|")[2].strip() for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line and "cumulative" not in line}


def test_import_tracking_loads_nothing_heavy():
    loaded = imported_modules("-c", "import sys; sys.path.insert(0, '.'); import tracking")
    assert "tracking" in loaded and "urllib.request" in loaded
    assert not loaded & HEAVY, loaded & HEAVY


def test_a_script_run_loads_nothing_heavy(standin, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"clients": [{"url": standin.url}]}))
    loaded = imported_modules(TRACKING, "maven", "1", "--config", str(config))
    assert len(standin.documents) == 1
    assert "http.client" in loaded  # proves the list is the run's
    assert not loaded & HEAVY, loaded & HEAVY
    assert "signal" not in loaded  # service mode only
