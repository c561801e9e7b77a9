"""CPython 3.8 and later: the probe runs, unchanged, on every interpreter this machine has."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from conftest import TRACKING, probe_env, write_config


def interpreters() -> dict[str, str]:
    """version -> path, for this interpreter and every other CPython 3.8+ found here."""
    candidates = [sys.executable]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    candidates += [shutil.which("python3.%d" % minor) or "" for minor in range(8, 16)]
    found = {}
    for path in filter(None, candidates):
        result = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                capture_output=True, text=True, timeout=30, check=False)
        version = result.stdout.strip()
        if result.returncode == 0 and tuple(map(int, version.split("."))) >= (3, 8):
            found.setdefault(version, path)
    return found


def test_every_available_cpython_delivers(standin, tmp_path):
    config = write_config(tmp_path, {"url": standin.url})
    versions = interpreters()
    for version, python in versions.items():
        dry = subprocess.run([python, "-I", TRACKING, "--dry-run", "maven", "1", "--config", config],
                             env=probe_env(), capture_output=True, text=True, timeout=30, check=False)
        assert dry.returncode == 0, (version, dry.stderr)
        run = subprocess.run([python, "-I", TRACKING, "maven", version, "--config", config],
                             env=probe_env(CI_JOB_ID=version.replace(".", "")), capture_output=True,
                             text=True, timeout=30, check=False)
        assert "delivered status=201" in run.stderr, (version, run.stderr)
    assert len(standin.documents) == len(versions)
    print("CPython versions tried:", ", ".join(sorted(versions)))
