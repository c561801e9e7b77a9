"""The pipeline (.gitlab-ci.yml): valid for GitLab, and its jobs pass when run here.

gitlab-ci-local (npm, 4.64.1 on Node 20) runs the jobs with its shell executor in a throw-away
git clone of the working tree. The test job runs the README's command, restricted from the
outside (PYTEST_ADDOPTS) so that it does not recurse into the image, pipeline and integration
tests. The build job runs with buildah on the local distroless equivalent, without pushing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagebase
from conftest import StandIn

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parent.parent
NOT_RECURSIVE = 'PYTEST_ADDOPTS=-m "not image and not integration and not pipeline"'
REGISTRY_IMAGE = "localhost/tracking-probe-pipeline"


def check_jsonschema() -> list[str] | None:
    if shutil.which("check-jsonschema"):
        return ["check-jsonschema"]
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "check_jsonschema"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git clone-like copy of the working tree (tracked and untracked, not ignored files)."""
    for tool, why in (("gitlab-ci-local", "npm install -g gitlab-ci-local@4.64.1"),
                      ("rsync", "gitlab-ci-local needs rsync"), ("git", "git")):  # fmt: skip
        if shutil.which(tool) is None:
            pytest.skip("%s not installed (%s)" % (tool, why))
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    target = tmp_path_factory.mktemp("pipeline")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    git = ["git", "-c", "user.name=tracking", "-c", "user.email=tracking@example.com"]
    origin = "https://gitlab.example.com/group/tracking-probe.git"
    for command in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "pipeline test"],
                    ["remote", "add", "origin", origin]):  # fmt: skip
        subprocess.run([*git, *command], cwd=target, check=True, capture_output=True)
    return target


def gitlab_ci_local(workspace: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gitlab-ci-local", "--force-shell-executor", "--no-color", *args],
        cwd=workspace, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_pipeline_file_is_valid_for_gitlab() -> None:
    command = check_jsonschema()
    if command is None:
        pytest.skip("check-jsonschema not installed (pip install check-jsonschema)")
    proc = subprocess.run(
        [*command, "--builtin-schema", "vendor.gitlab-ci", "--data-transform", "gitlab-ci",
         str(ROOT / ".gitlab-ci.yml")], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_job_passes(workspace: Path) -> None:
    proc = gitlab_ci_local(workspace, "lint")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "PASS  lint" in proc.stdout


def test_test_job_runs_the_readme_command_and_keeps_a_junit_report(workspace: Path) -> None:
    proc = gitlab_ci_local(workspace, "--variable", NOT_RECURSIVE, "test")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "PASS  test" in proc.stdout
    assert " passed" in proc.stdout and "deselected" in proc.stdout
    assert "<testsuite" in (workspace / "report.xml").read_text()


# ==== The build job, with buildah on the local base, not pushed




def build_job(workspace: Path, base: str, *variables: str) -> subprocess.CompletedProcess[str]:
    env = imagebase.podman_env()
    fixed = [
        "TRACKING_PUBLISH=false",
        "TRACKING_BASE_IMAGE=" + base,
        "CI_REGISTRY_IMAGE=" + REGISTRY_IMAGE,
        "STORAGE_DRIVER=overlay",  # the job's vfs is for unprivileged runners; our storage is overlay
        "CONTAINERS_CONF=" + env["CONTAINERS_CONF"],
        "CONTAINERS_STORAGE_CONF=" + env["CONTAINERS_STORAGE_CONF"],
    ]
    args = [arg for variable in [*fixed, *variables] for arg in ("--variable", variable)]
    for tag in ("main", "1.2.3", "1.2", "1"):
        imagebase.run(["podman", "rmi", "-f", "%s:%s" % (REGISTRY_IMAGE, tag)], check=False)
    return gitlab_ci_local(workspace, *args, "build-and-publish", timeout=600)


def baked_configuration(tag: str) -> dict[str, object] | None:
    read = "import os; p = '/app/config.json'; print(open(p).read() if os.path.exists(p) else 'null')"
    proc = imagebase.run(["podman", "run", "--rm", "--entrypoint",
                          json.dumps(["/usr/bin/python3.13", "-I", "-c", read]), tag])  # fmt: skip
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def image_exists(tag: str) -> bool:
    return imagebase.run(["podman", "image", "exists", tag], check=False).returncode == 0


def test_build_job_bakes_an_inline_configuration_after_checking_it(workspace: Path, base: str) -> None:
    standin = StandIn()
    try:
        config = {"clients": [{"url": standin.url, "esMajorVersion": 8}]}
        proc = build_job(workspace, base, "TRACKING_CONFIGURATION=" + json.dumps(config))
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        assert "Variable TRACKING_CONFIGURATION (inline JSON)" in output
        assert "ok " in output and standin.url in output  # tracking.py --check
        assert standin.puts() == []  # --check and --dry-run index nothing
        assert baked_configuration(REGISTRY_IMAGE + ":main") == config
    finally:
        standin.close()


def test_build_job_reads_a_file_variable_and_tags_a_semver_release(
    workspace: Path, base: str, tmp_path: Path
) -> None:
    config = {"clients": [{"url": "https://elasticsearch.example.com:9200", "esMajorVersion": 8}]}
    path = tmp_path / "TRACKING_CONFIGURATION"  # a File variable's value is a path
    path.write_text(json.dumps(config, indent=2))
    proc = build_job(workspace, base, "TRACKING_CONFIGURATION=%s" % path, "TRACKING_CHECK_SERVERS=false",
                     "CI_COMMIT_TAG=v1.2.3")  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "File variable TRACKING_CONFIGURATION" in output and "--check skipped" in output
    for tag in ("main", "1.2.3", "1.2", "1"):
        assert image_exists("%s:%s" % (REGISTRY_IMAGE, tag)), tag
    assert baked_configuration(REGISTRY_IMAGE + ":1.2.3") == config


def test_build_job_refuses_a_broken_configuration(workspace: Path, base: str) -> None:
    broken = json.dumps({"clients": [{"url": "ftp://nowhere", "timeout": "5s"}]})
    proc = build_job(workspace, base, "TRACKING_CONFIGURATION=" + broken, "TRACKING_CHECK_SERVERS=false")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "not a valid configuration" in output
    assert not image_exists(REGISTRY_IMAGE + ":main")


def test_build_job_without_configuration_warns_loudly_and_builds(workspace: Path, base: str) -> None:
    proc = build_job(workspace, base)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "WARNING: TRACKING_CONFIGURATION is not set" in output
    assert baked_configuration(REGISTRY_IMAGE + ":main") is None
