"""The floor: the least a probe has to do to deliver one CI job document.

Reads the same environment as tracking.py (TRACKING_CONFIGURATION as inline JSON, the CI_* and
GITLAB_USER_* variables, the template name and version from the arguments or the environment),
builds a document of the same shape and sends it with one urllib.request PUT per configured
server, with the same TLS settings (ssl.create_default_context(cafile=...), TLS 1.2 minimum),
through an opener that has only the handlers a PUT needs.
No validation, no retries, no logging: the benchmark compares tracking.py with this.

Usage: python bench/floor.py [TEMPLATE_NAME TEMPLATE_VERSION]
"""

import base64
import hashlib
import json
import os
import ssl
import sys
import time
import urllib.request


def build_document(environ, name, version, now):
    """The document tracking.py sends, from the same variables (the floor skips validation)."""

    def number(key):
        value = environ.get(key, "")
        return int(value) if value.isdigit() else None

    def drop_empty(mapping):
        return {k: v for k, v in mapping.items() if v not in (None, "", {})}

    ci = {
        "user": drop_empty({"id": number("GITLAB_USER_ID"), "login": environ.get("GITLAB_USER_LOGIN")}),
        "project": drop_empty({"id": number("CI_PROJECT_ID"), "path": environ.get("CI_PROJECT_URL")}),
        "build": drop_empty({"ref": environ.get("CI_COMMIT_REF_NAME")}),
        "job": drop_empty(
            {
                "id": number("CI_JOB_ID"),
                "name": environ.get("CI_JOB_NAME"),
                "stage": environ.get("CI_JOB_STAGE"),
                "url": environ.get("CI_JOB_URL"),
            }
        ),
        "pipeline": drop_empty({"id": number("CI_PIPELINE_ID"), "url": environ.get("CI_PIPELINE_URL")}),
        "runner": drop_empty(
            {
                "id": number("CI_RUNNER_ID"),
                "description": environ.get("CI_RUNNER_DESCRIPTION"),
                "tags": environ.get("CI_RUNNER_TAGS"),
                "version": environ.get("CI_RUNNER_VERSION"),
            }
        ),
    }
    return {
        "@type": "ci-job",
        "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "template": {"name": name, "version": version},
        "ci": drop_empty(ci),
    }


def document_id(environ, name):
    key = "%s|%s|%s" % (environ.get("CI_SERVER_URL", ""), environ.get("CI_JOB_ID", ""), name)
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def opener_for(context):
    """Only the handlers one PUT needs. build_opener()/urlopen() without an HTTPS context would
    also make a default HTTPSHandler, which on Python 3.12+ loads the system CA store (tens of ms)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.HTTPHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)
    if context is not None:
        opener.add_handler(urllib.request.HTTPSHandler(context=context))
    return opener


def put(client, path, body, opener):
    headers = {"Content-Type": "application/json"}
    auth = client.get("authentication") or {}
    if "username" in auth:
        token = base64.b64encode(("%s:%s" % (auth["username"], auth.get("password", ""))).encode())
        headers["Authorization"] = "Basic " + token.decode()
    request = urllib.request.Request(
        client["url"].rstrip("/") + path, data=body, headers=headers, method="PUT"
    )
    try:
        with opener.open(request, timeout=float(client.get("timeout", 5))) as response:
            response.read()
    except OSError as error:  # HTTPError and URLError are OSErrors
        print("floor: %s: %s" % (client["url"], error), file=sys.stderr)


def main(argv):
    environ = os.environ
    name = argv[0] if argv else environ.get("TRACKING_TEMPLATE_NAME", "")
    version = argv[1] if len(argv) > 1 else environ.get("TRACKING_TEMPLATE_VERSION", "")
    clients = json.loads(environ["TRACKING_CONFIGURATION"])["clients"]
    now = time.time()
    body = json.dumps(build_document(environ, name, version, now), separators=(",", ":")).encode()
    path = "/%sci-job-%s/_create/%s" % (
        clients[0].get("indexPrefix", "tbc-"),
        time.strftime("%Y.%m", time.gmtime(now)),
        document_id(environ, name),
    )
    context = None
    if any(c["url"].startswith("https:") for c in clients):
        context = ssl.create_default_context(cafile=clients[0].get("caCertificate"))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    opener = opener_for(context)
    if len(clients) == 1:
        put(clients[0], path, body, opener)
        return 0
    import threading  # only a fan-out needs threads

    threads = [threading.Thread(target=put, args=(c, path, body, opener), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
