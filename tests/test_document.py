"""The ci-job document, built from GitLab's predefined variables."""

from __future__ import annotations

import json

import pytest
from conftest import GITLAB_ENV, ROOT, probe_env, run_probe

import tracking

NOW = 1603092848.0  # 2020-10-19T07:34:08Z
CONFIG = str(ROOT / "config.example.json")


def test_full_job_gives_the_documented_shape():
    document = tracking.build_document(GITLAB_ENV, "maven", "1.0.0", NOW)
    assert document == {
        "@type": "ci-job",
        "@timestamp": "2020-10-19T07:34:08Z",
        "template": {"name": "maven", "version": "1.0.0"},
        "ci": {
            "user": {"id": 6097, "login": "pismy"},
            "project": {"id": 23568, "path": GITLAB_ENV["CI_PROJECT_URL"]},
            "build": {"ref": "master"},
            "job": {"id": 8585338, "name": "mvn-build", "stage": "package-publish",
                    "url": GITLAB_ENV["CI_JOB_URL"]},
            "pipeline": {"id": 1835260, "url": GITLAB_ENV["CI_PIPELINE_URL"]},
            "runner": {"id": 44949, "description": "shared-runners-manager-4.gitlab.com",
                       "tags": "gce, east-c, shared, docker, linux", "version": "13.12.0-rc1"},
        },
    }


@pytest.mark.parametrize(("tags", "expected"), [
    ("docker, linux", "docker, linux"),
    ("docker,linux", "docker, linux"),
    ('["docker", "linux"]', "docker, linux"),
    ("[]", ""),
    ("", ""),
    ("docker", "docker"),
    ('["odd \\"quoted\\" tag", "x"]', 'odd "quoted" tag, x'),
    ("[docker, linux]", "docker, linux"),  # Ruby-inspect shapes that are not JSON
])
def test_runner_tags_in_both_gitlab_formats_become_one_string(tags, expected):
    assert tracking.normalize_tags(tags) == expected


def test_pipeline_without_user_leaves_user_fields_out():
    env = {k: v for k, v in GITLAB_ENV.items() if not k.startswith("GITLAB_USER")}
    document = tracking.build_document(env, "maven", "1.0.0", NOW)
    assert document["ci"]["user"] == {}
    assert document["ci"]["job"]["id"] == 8585338


@pytest.mark.parametrize("value", ["", "abc", "12a", "-5", "1.5", "١٢٣", "99999999999999999999"])
def test_ids_that_are_not_decimal_integers_are_left_out(value):
    env = {**GITLAB_ENV, "CI_JOB_ID": value, "CI_PROJECT_ID": value}
    document = tracking.build_document(env, "maven", "1.0.0", NOW)
    assert "id" not in document["ci"]["job"]
    assert "id" not in document["ci"]["project"]
    assert document["ci"]["job"]["name"] == "mvn-build"


def test_ids_are_json_integers():
    document = tracking.build_document(GITLAB_ENV, "maven", "1.0.0", NOW)
    for section in ("user", "project", "job", "pipeline", "runner"):
        assert type(document["ci"][section]["id"]) is int


def test_missing_variables_are_left_out_never_null():
    document = tracking.build_document({}, "maven", "1.0.0", NOW)
    assert document["ci"] == {"user": {}, "project": {}, "build": {}, "job": {}, "pipeline": {},
                              "runner": {}}
    assert "null" not in json.dumps(document)


def test_empty_runner_description_is_kept_as_empty_string():
    document = tracking.build_document({**GITLAB_ENV, "CI_RUNNER_DESCRIPTION": ""}, "m", "1", NOW)
    assert document["ci"]["runner"]["description"] == ""


def test_unicode_passes_through_intact_to_the_wire():
    env = probe_env(CI_JOB_NAME="construire 🚀 l'été", CI_RUNNER_DESCRIPTION="ランナー")
    result = run_probe("--dry-run", "maven", "3.9.0", env=env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ci"]["job"]["name"] == "construire 🚀 l'été"
    assert document["ci"]["runner"]["description"] == "ランナー"


def test_timestamp_is_utc_to_the_second_with_z():
    assert tracking.format_timestamp(NOW) == "2020-10-19T07:34:08Z"
    assert tracking.format_timestamp(NOW + 0.999) == "2020-10-19T07:34:08Z"


def test_document_id_is_deterministic_per_instance_job_and_template():
    same = tracking.document_id(GITLAB_ENV, "maven", b"\x01" * 16)
    assert same == tracking.document_id(GITLAB_ENV, "maven", b"\x02" * 16)
    assert same != tracking.document_id(GITLAB_ENV, "gradle", b"\x01" * 16)
    assert same != tracking.document_id({**GITLAB_ENV, "CI_JOB_ID": "8585339"}, "maven", b"")
    assert same != tracking.document_id({**GITLAB_ENV, "CI_SERVER_URL": "https://other"}, "maven", b"")


def test_document_id_without_server_url_uses_the_job_url_origin():
    old_gitlab = {k: v for k, v in GITLAB_ENV.items() if k != "CI_SERVER_URL"}
    assert tracking.document_id(old_gitlab, "maven", b"") == tracking.document_id(GITLAB_ENV, "maven", b"")


def test_outside_ci_the_id_is_random():
    assert tracking.document_id({}, "maven", b"\x01" * 16) == "01" * 16
    assert tracking.document_id({}, "maven", b"\x02" * 16) == "02" * 16
    ids = {json.loads(run_probe("--dry-run", "--config", CONFIG, "maven", "1",
                                env=probe_env(CI_JOB_ID="")).stdout)["requests"][0]["documentId"]
           for _ in range(2)}
    assert len(ids) == 2


def test_template_comes_from_variables_when_arguments_are_absent():
    env = probe_env(TRACKING_TEMPLATE_NAME="gradle", TRACKING_TEMPLATE_VERSION="2.1.0")
    result = run_probe("--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["template"] == {"name": "gradle", "version": "2.1.0"}


def test_arguments_win_over_variables():
    env = probe_env(TRACKING_TEMPLATE_NAME="gradle", TRACKING_TEMPLATE_VERSION="2.1.0")
    result = run_probe("--dry-run", "maven", "3.9.0", env=env)
    assert json.loads(result.stdout)["template"] == {"name": "maven", "version": "3.9.0"}


def test_no_template_anywhere_is_a_usage_error():
    result = run_probe("--dry-run")
    assert result.returncode == 2
    assert "TEMPLATE_NAME" in result.stderr
