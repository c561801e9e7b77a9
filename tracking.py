"""Tracking probe: index one document per GitLab CI job into Elasticsearch/OpenSearch.

Usage: python tracking.py [--service] [TEMPLATE_NAME TEMPLATE_VERSION] [options]

Reads GitLab's predefined CI variables, builds one small "ci-job" JSON document
(template name and version, user, project, ref, job, pipeline, runner) and
indexes it, with create semantics and a deterministic id, into every cluster of
the configuration, concurrently, each within its own time budget.

Arguments:
  TEMPLATE_NAME TEMPLATE_VERSION  the template and its version
                        (default: $TRACKING_TEMPLATE_NAME and $TRACKING_TEMPLATE_VERSION)
Options:
  --service             service-container mode: listen on a TCP port for the runner's
                        health check, deliver, stay alive until SIGTERM or SIGINT
                        (port: $HEALTHCHECK_TCP_PORT, else $TRACKING_SERVICE_PORT, else 18733)
  --config PATH         configuration file (default: $TRACKING_CONFIGURATION, inline JSON
                        or a path, else config.json beside tracking.py)
  --dry-run             print the document and each request; open no connection
  --check               contact each server without indexing: reachability, TLS,
                        authentication, flavour and version, write privilege
  --strict              exit 1 when any server failed (default: exit 0)
  -q, --quiet           log warnings, failures and errors only
  -v, --verbose         also log each attempt
  --version             print the version
  -h, --help            print this help
Environment:
  TRACKING_DISABLED=1|true|yes|on  send nothing (service mode still listens)

Exit codes:
  0  delivered, or delivery failed without --strict (tracking is fail-open)
  1  delivery failed with --strict, or --check found a problem
  2  usage or configuration error

Standard library only, CPython 3.8+: copy this one file anywhere and run it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs start-up time; mypy treats this branch as taken
    import ssl
    from typing import Any, Callable, Iterable, Mapping

    Json = Any
    Environ = Mapping[str, str]
    TlsSettings = tuple[str | None, str | None, str | None, bool]  # CA, certificate, key, skip

__version__ = "1.0.0"

# ============================================================================ Constants

CONFIGURATION_VARIABLE = "TRACKING_CONFIGURATION"
DISABLED_VARIABLE = "TRACKING_DISABLED"
TEMPLATE_NAME_VARIABLE = "TRACKING_TEMPLATE_NAME"
TEMPLATE_VERSION_VARIABLE = "TRACKING_TEMPLATE_VERSION"
PORT_VARIABLES = ("HEALTHCHECK_TCP_PORT", "TRACKING_SERVICE_PORT")
DEFAULT_SERVICE_PORT = 18733  # below the ephemeral range, clear of common service ports
TRUE_VALUES = ("1", "true", "yes", "on")

DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 3600  # seconds: anything longer is a typo (milliseconds?), not a budget
DEFAULT_ES_MAJOR_VERSION = 7
# Elasticsearch 5-9, and OpenSearch 1-3 by their own major version.
ES_MAJOR_VERSIONS = (1, 2, 3, 5, 6, 7, 8, 9)
DEFAULT_INDEX_SUFFIX = "ci-job-{YYYY}.{MM}"
INDEX_PLACEHOLDERS = ("{YYYY}", "{MM}", "{DD}")
INDEX_FORBIDDEN_CHARACTERS = '\\/*?"<>|,#: '

RETRY_STATUSES = (429, 502, 503, 504)
# What servers without security answer to its endpoints: no such handler, security off, or
# (no such endpoint at all) "/_security/..." read as an index name (OpenSearch 1.x: no such index).
SECURITY_ABSENT_HINTS = ("no handler found", "incorrect http method", "not enabled",
                         "explicitly enabled", "invalid index name [_", "no such index [_")
# How servers refuse a request path of another version: Elasticsearch 8+ and OpenSearch 2+ a
# typed URL, Elasticsearch 5 and 6 a typeless one (read as the type "_create").
WRONG_VERSION_SIGNS = ("no handler found for uri", "can't start with '_'")
BACKOFF_BASE = 0.1  # seconds before the second round of attempts
BACKOFF_CAP = 2.0
JOIN_MARGIN = 0.25  # seconds the main thread waits for a delivery past its deadline
MIN_ATTEMPT_TIME = 0.1  # seconds: no backoff ends later than this before the deadline
ERROR_BODY_LIMIT = 65536

USER_AGENT = "tracking-probe/%s (python/%d.%d)" % ((__version__, *sys.version_info[:2]))
MASK = "***"
USAGE = "usage: python tracking.py [--service] [TEMPLATE_NAME TEMPLATE_VERSION] [options]"
HELP = (__doc__ or USAGE).strip()  # the module docstring is the --help text

NUMBER = (int, float)
CLIENT_KEYS = {  # each key of a client, and the JSON type of its value
    "url": str, "urls": list, "authentication": dict, "timeout": NUMBER, "indexPrefix": str,
    "index": str, "esMajorVersion": int, "caCertificate": str, "clientCertificate": str,
    "clientKey": str, "skipSslVerification": bool, "proxy": str,
}
AUTHENTICATION_KEYS = ("username", "password", "apiKey", "bearerToken")
SECRET_KEYS = ("password", "apiKey", "bearerToken")  # masked in every output


def write(stream: Any, text: str) -> None:
    """Write one line as UTF-8, whatever the locale says; never raise (a service container
    may have no stderr, and output must never break the host job)."""
    try:
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write((text + "\n").encode("utf-8", "replace"))
        else:
            stream.write(text + "\n")
        stream.flush()
    except Exception:  # noqa: BLE001, S110
        pass


def log(message: str) -> None:
    """One log line on stderr."""
    write(sys.stderr, "tracking: " + message)


def show(text: str) -> None:
    """Output on stdout (--dry-run, --check, --help)."""
    write(sys.stdout, text)


# ============================================================================ Configuration


class ConfigError(Exception):
    """A configuration or usage problem, named by its JSON path (exit code 2)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(("%s: %s" % (path, message)) if path else message)


class Client:
    """One cluster to deliver to, validated."""

    __slots__ = (
        "path", "urls", "authorization", "timeout", "index_pattern", "es_major_version",
        "ca_certificate", "client_certificate", "client_key", "skip_ssl_verification",
        "proxy", "secrets",
    )

    def __init__(self, path: str, urls: list[str], authorization: str | None, timeout: float,
                 index_pattern: str, es_major_version: int, ca_certificate: str | None,
                 client_certificate: str | None, client_key: str | None,
                 skip_ssl_verification: bool, proxy: str | None, secrets: list[str]) -> None:
        self.path = path
        self.urls = urls
        self.authorization = authorization
        self.timeout = timeout
        self.index_pattern = index_pattern
        self.es_major_version = es_major_version
        self.ca_certificate = ca_certificate
        self.client_certificate = client_certificate
        self.client_key = client_key
        self.skip_ssl_verification = skip_ssl_verification
        self.proxy = proxy
        self.secrets = secrets

    @property
    def server(self) -> str:
        """The first node URL, fit for a log line (it never holds credentials)."""
        return self.urls[0]

    @property
    def uses_tls(self) -> bool:
        return any(url.startswith("https:") for url in self.urls)

    def tls_settings(self) -> TlsSettings:
        return (self.ca_certificate, self.client_certificate, self.client_key,
                self.skip_ssl_verification)


def describe(value: Json, reveal: bool = True) -> str:
    """A JSON value as an error message shows it: a string only when reveal (it might be a
    secret otherwise), and never the credentials of a URL."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return redact(json.dumps(value, ensure_ascii=False), ()) if reveal else "a string"
    return "an array" if isinstance(value, list) else "an object"


def expand_variables(text: str, environ: Environ, path: str) -> str:
    """Replace ${NAME} by the environment variable NAME; $$ is a literal $."""
    if "$" not in text:
        return text
    out = []
    position = 0
    while True:
        dollar = text.find("$", position)
        if dollar < 0:
            out.append(text[position:])
            return "".join(out)
        out.append(text[position:dollar])
        following = text[dollar + 1:dollar + 2]
        if following == "$":
            out.append("$")
            position = dollar + 2
        elif following == "{":
            end = text.find("}", dollar)
            name = text[dollar + 2:end] if end > 0 else ""
            if not name.replace("_", "a").isalnum() or not name.isascii():
                raise ConfigError(path, "malformed variable reference (use ${NAME}, or $$ for $)")
            if name not in environ:
                raise ConfigError(path, "environment variable %s is not set" % name)
            out.append(environ[name])
            position = end + 1
        else:
            out.append("$")
            position = dollar + 1


def substitute(value: Json, environ: Environ, path: str) -> Json:
    """Expand ${NAME} in every string of a JSON value, recursively."""
    if isinstance(value, str):
        return expand_variables(value, environ, path)
    if isinstance(value, list):
        return [substitute(item, environ, "%s[%d]" % (path, i)) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: substitute(item, environ, "%s.%s" % (path, key)) for key, item in value.items()}
    return value


def parse_json(text: str, source: str) -> Json:
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(source, "invalid JSON: nested too deeply") from None
    except ValueError as error:
        # The message holds a position, never the text itself (it may hold a password).
        message = getattr(error, "msg", "invalid JSON")
        line, column = getattr(error, "lineno", 0), getattr(error, "colno", 0)
        raise ConfigError(source, "invalid JSON: %s (line %d, column %d)"
                          % (message, line, column)) from None


def load_configuration(text: str, environ: Environ, source: str = "configuration",
                       warn: Callable[[str], None] = log) -> list[Client]:
    """Parse and validate the configuration text; raise ConfigError naming the JSON path."""
    raw = parse_json(text, source)
    if not isinstance(raw, dict):
        raise ConfigError("", "%s: expected a JSON object, got %s" % (source, describe(raw)))
    for key in raw:
        if key != "clients":
            warn("warning: %s: unknown key, ignored" % key)
    entries = raw.get("clients")
    if entries is None:
        raise ConfigError("clients", "missing (expected an array of servers)")
    if not isinstance(entries, list):
        raise ConfigError("clients", "expected an array, got %s" % describe(entries))
    return [parse_client(entry, environ, "clients[%d]" % i, warn) for i, entry in enumerate(entries)]


def parse_client(entry: Json, environ: Environ, path: str, warn: Callable[[str], None]) -> Client:
    if not isinstance(entry, dict):
        raise ConfigError(path, "expected an object, got %s" % describe(entry))
    for key, value in entry.items():
        if key not in CLIENT_KEYS:
            warn("warning: %s.%s: unknown key, ignored" % (path, key))
        else:  # before ${NAME} is expanded: an error shows the reference, never what it holds
            check_type(value, CLIENT_KEYS[key], "%s.%s" % (path, key))
    raw_index = entry.get("index", entry.get("indexPrefix", "") + DEFAULT_INDEX_SUFFIX)
    # Unknown keys are ignored, so their ${NAME} too: an unset one in a "comment" is no error.
    entry = substitute({k: v for k, v in entry.items() if k in CLIENT_KEYS}, environ, path)
    secrets: list[str] = []

    if ("url" in entry) == ("urls" in entry):
        raise ConfigError(path, 'expected exactly one of "url" or "urls"')
    if "url" in entry:
        raw_urls = [require(entry, "url", str, path)]
        url_paths = [path + ".url"]
    else:
        raw_urls = require(entry, "urls", list, path)
        if not raw_urls:
            raise ConfigError(path + ".urls", "expected at least one URL")
        url_paths = ["%s.urls[%d]" % (path, i) for i in range(len(raw_urls))]
    urls = []
    first_credentials = None
    for raw_url, url_path in zip(raw_urls, url_paths):
        if not isinstance(raw_url, str):
            raise ConfigError(url_path, "expected a string, got %s" % describe(raw_url))
        url, credentials = parse_server_url(raw_url, url_path)
        urls.append(url)
        if credentials:
            first_credentials = first_credentials or credentials
            secrets.append(credentials[1])

    authorization = None
    if "authentication" in entry:
        authentication = entry["authentication"]
        authorization = authorization_header(authentication, path + ".authentication", warn)
        secrets.extend(authentication.get(key, "") for key in SECRET_KEYS)
    elif first_credentials:
        authorization = basic_authorization(*first_credentials)
    if authorization:
        secrets.append(authorization.split(" ", 1)[1])

    timeout = optional(entry, "timeout", NUMBER, path, DEFAULT_TIMEOUT)
    if not 0 < timeout <= MAX_TIMEOUT:
        raise ConfigError(path + ".timeout", "expected a number of seconds above 0 and at most %d, got %s"
                          % (MAX_TIMEOUT, timeout))

    prefix = optional(entry, "indexPrefix", str, path, "")
    if "index" in entry:
        index_pattern, index_path = require(entry, "index", str, path), path + ".index"
        if "indexPrefix" in entry:
            warn("warning: %s.indexPrefix: ignored, %s.index names the whole index" % (path, path))
    else:
        index_pattern, index_path = prefix + DEFAULT_INDEX_SUFFIX, path + ".indexPrefix"
    problem = index_name_problem(expand_index(index_pattern, time.gmtime(0)))
    if problem:
        raise ConfigError(index_path, "%s (index %s)" % (problem, json.dumps(raw_index)))

    version = optional(entry, "esMajorVersion", int, path, DEFAULT_ES_MAJOR_VERSION)
    if version not in ES_MAJOR_VERSIONS:
        raise ConfigError(path + ".esMajorVersion", "expected one of %s, got %s"
                          % (", ".join(map(str, ES_MAJOR_VERSIONS)), version))

    certificate = optional(entry, "clientCertificate", str, path, None)
    key = optional(entry, "clientKey", str, path, None)
    if (certificate is None) != (key is None):
        raise ConfigError(path, '"clientCertificate" and "clientKey" go together')
    if key and key.lstrip().startswith("-----"):
        secrets.append(key)

    proxy = optional(entry, "proxy", str, path, None)
    if proxy:
        proxy_base, credentials = parse_server_url(proxy, path + ".proxy")
        if not proxy_base.startswith("http://") or proxy_base.count("/") > 2:
            raise ConfigError(path + ".proxy", "expected http://[user:password@]host[:port] (the "
                                               "proxy is spoken to in plain HTTP; https servers are "
                                               "tunnelled)")
        if credentials:
            secrets.append(credentials[1])  # the proxy's user name is no secret, its password is

    return Client(
        path=path, urls=urls, authorization=authorization, timeout=float(timeout),
        index_pattern=index_pattern, es_major_version=version,
        ca_certificate=optional(entry, "caCertificate", str, path, None),
        client_certificate=certificate, client_key=key,
        skip_ssl_verification=optional(entry, "skipSslVerification", bool, path, False),
        proxy=proxy, secrets=[s for s in secrets if s],
    )


TYPE_NAMES = {str: "a string", list: "an array", bool: "true or false", int: "an integer",
              dict: "an object"}


def require(entry: dict[str, Json], key: str, kind: Any, path: str) -> Any:
    if key not in entry:
        raise ConfigError(path, "missing %s" % json.dumps(key))
    return check_type(entry[key], kind, "%s.%s" % (path, key))


def optional(entry: dict[str, Json], key: str, kind: Any, path: str, default: Any) -> Any:
    if key not in entry:
        return default
    return check_type(entry[key], kind, "%s.%s" % (path, key))


def check_type(value: Json, kind: Any, path: str) -> Json:
    wrong_bool = isinstance(value, bool) and kind is not bool
    if wrong_bool or not isinstance(value, kind):
        expected = "a number" if isinstance(kind, tuple) else TYPE_NAMES[kind]
        reveal = ".authentication" not in path and not path.endswith(".clientKey")
        raise ConfigError(path, "expected %s, got %s" % (expected, describe(value, reveal)))
    return value


def url_credentials(url: str) -> tuple[str, str] | None:
    """The user name and password a URL carries ("user:password@"), decoded; None without."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")


def parse_server_url(raw: str, path: str) -> tuple[str, tuple[str, str] | None]:
    """Validate a node URL; return it without credentials, and the credentials it held."""
    from urllib.parse import urlsplit

    if any(c.isspace() or not c.isprintable() for c in raw.strip()):
        raise ConfigError(path, "a URL cannot contain spaces or control characters (percent-encode them)")
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(path, "not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, "expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ConfigError(path, "a server URL takes no query (?) or fragment (#)")
    host = parts.hostname
    if ":" in host:
        host = "[%s]" % host
    netloc = host if port is None else "%s:%d" % (host, port)
    base = "%s://%s%s" % (parts.scheme, netloc, parts.path.rstrip("/"))
    return base, url_credentials(raw.strip())


def basic_authorization(username: str, password: str) -> str:
    import base64

    token = base64.b64encode(("%s:%s" % (username, password)).encode("utf-8")).decode("ascii")
    return "Basic " + token


def authorization_header(authentication: Json, path: str,
                         warn: Callable[[str], None] = log) -> str | None:
    """The Authorization header for one of the three kinds; None for an empty credential."""
    if not isinstance(authentication, dict):
        raise ConfigError(path, "expected an object, got %s" % describe(authentication, reveal=False))
    for key, value in authentication.items():
        if key not in AUTHENTICATION_KEYS:
            warn("warning: %s.%s: unknown key, ignored" % (path, key))
        elif not isinstance(value, str):  # never echo the value: it may be a secret
            raise ConfigError("%s.%s" % (path, key), "expected a string")
        elif "\r" in value or "\n" in value:
            raise ConfigError("%s.%s" % (path, key), "must be a single line")
        elif key in ("apiKey", "bearerToken") and not (value.isascii() and value.isprintable()
                                                       and " " not in value):
            raise ConfigError("%s.%s" % (path, key), "must be printable ASCII without spaces")
    kinds = [key for key in ("username", "apiKey", "bearerToken") if key in authentication]
    if len(kinds) != 1 or ("password" in authentication and kinds != ["username"]):
        raise ConfigError(path, 'expected {"username", "password"}, {"apiKey"} or {"bearerToken"}, '
                                "got keys %s" % json.dumps(sorted(authentication)))
    value = str(authentication[kinds[0]])
    if not value:
        return None  # an empty username, apiKey or bearerToken: no authentication
    if kinds == ["apiKey"]:
        return "ApiKey " + value
    if kinds == ["bearerToken"]:
        return "Bearer " + value
    return basic_authorization(value, authentication.get("password", ""))


# ============================================================================ The document

USER_FIELDS = (("id", "GITLAB_USER_ID"), ("login", "GITLAB_USER_LOGIN"))
DOCUMENT_FIELDS = (
    ("user", USER_FIELDS),
    ("project", (("id", "CI_PROJECT_ID"), ("path", "CI_PROJECT_URL"))),
    ("build", (("ref", "CI_COMMIT_REF_NAME"),)),
    ("job", (("id", "CI_JOB_ID"), ("name", "CI_JOB_NAME"), ("stage", "CI_JOB_STAGE"),
             ("url", "CI_JOB_URL"))),
    ("pipeline", (("id", "CI_PIPELINE_ID"), ("url", "CI_PIPELINE_URL"))),
    ("runner", (("id", "CI_RUNNER_ID"), ("description", "CI_RUNNER_DESCRIPTION"),
                ("tags", "CI_RUNNER_TAGS"), ("version", "CI_RUNNER_VERSION"))),
)
LONG_MAX = 2 ** 63 - 1  # Elasticsearch maps JSON integers as "long"


def parse_id(text: str | None) -> int | None:
    """A GitLab id (a decimal string) as an integer, or None when it is not one."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if number <= LONG_MAX else None


def normalize_tags(text: str) -> str:
    """Runner tags as "a, b" whether GitLab sent "a, b" or '["a", "b"]'."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            tags = json.loads(text)
        except ValueError:
            tags = None
        if not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
            tags = [tag.strip().strip("\"'") for tag in text[1:-1].split(",")]
    else:
        tags = text.split(",")
    return ", ".join(tag.strip() for tag in tags if tag.strip())


def format_timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def build_document(environ: Environ, template_name: str, template_version: str,
                   now: float) -> dict[str, Json]:
    """The ci-job document; missing variables and ids that are not integers are left out."""
    ci: dict[str, Json] = {}
    for section, fields in DOCUMENT_FIELDS:
        values: dict[str, Json] = {}
        for field, variable in fields:
            text = environ.get(variable)
            if text is None:
                continue
            if field == "id":
                number = parse_id(text)
                if number is not None:
                    values[field] = number
            elif field == "tags":
                values[field] = normalize_tags(text)
            else:
                values[field] = text
        ci[section] = values
    return {
        "@type": "ci-job",
        "@timestamp": format_timestamp(now),
        "template": {"name": template_name, "version": template_version},
        "ci": ci,
    }


def document_id(environ: Environ, template_name: str, random_bytes: bytes) -> str:
    """Same GitLab instance, job and template: same id, so a retry never duplicates.

    Outside CI (no job id) the id comes from random_bytes."""
    job_id = parse_id(environ.get("CI_JOB_ID"))
    if job_id is None:
        return random_bytes.hex()
    import hashlib

    instance = environ.get("CI_SERVER_URL") or server_origin(environ.get("CI_JOB_URL", ""))
    key = "\n".join((instance.rstrip("/"), str(job_id), template_name))
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def server_origin(url: str) -> str:
    """"https://gitlab.example.com" from any URL on that instance (for GitLab < 12.7)."""
    scheme, _, rest = url.partition("://")
    return "%s://%s" % (scheme, rest.split("/", 1)[0]) if rest else ""


# ============================================================================ Transport


def expand_index(pattern: str, moment: time.struct_time) -> str:
    """Fill the date placeholders {YYYY}, {MM} and {DD} (UTC)."""
    return (pattern.replace("{YYYY}", "%04d" % moment.tm_year)
            .replace("{MM}", "%02d" % moment.tm_mon)
            .replace("{DD}", "%02d" % moment.tm_mday))


def index_name_problem(name: str) -> str | None:
    """Why Elasticsearch would refuse this index name, or None when it is valid."""
    if "{" in name or "}" in name:
        return "unknown placeholder (known: %s)" % ", ".join(INDEX_PLACEHOLDERS)
    if not name or name in (".", ".."):
        return "an index name cannot be empty, . or .."
    if name != name.lower():
        return "an index name must be lowercase"
    bad = sorted(set(c for c in name if c in INDEX_FORBIDDEN_CHARACTERS or not c.isprintable()))
    if bad:
        return "an index name cannot contain %s" % " ".join(json.dumps(c) for c in bad)
    if name[0] in "-_+":
        return "an index name cannot start with -, _ or +"
    if len(name.encode("utf-8")) > 255:
        return "an index name is at most 255 bytes"
    return None


def request_path(index: str, identifier: str, es_major_version: int) -> str:
    """The create-document path for this server version, every segment percent-encoded."""
    from urllib.parse import quote

    index, identifier = quote(index, safe=""), quote(identifier, safe="")
    if es_major_version == 5:
        return "/%s/doc/%s/_create" % (index, identifier)  # 5.x: a type not starting with _
    if es_major_version == 6:
        return "/%s/_doc/%s/_create" % (index, identifier)
    return "/%s/_create/%s" % (index, identifier)


def request_headers(client: Client) -> dict[str, str]:
    headers = {
        # Plain JSON: the 8.x "compatible-with" media type breaks 6.x, 7.x and OpenSearch.
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    if client.authorization:
        headers["Authorization"] = client.authorization
    return headers


def masked_headers(headers: Mapping[str, str]) -> dict[str, str]:
    masked = dict(headers)
    if "Authorization" in masked:
        masked["Authorization"] = masked["Authorization"].split(" ", 1)[0] + " " + MASK
    return masked


def redact(text: str, secrets: Iterable[str]) -> str:
    """Text fit for output: credentials inside URLs and every known secret masked."""
    import re

    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, MASK)
    # Then whatever stands between "://" and the last "@" of a host part: a password may hold "@".
    return re.sub(r"(?<=://)[^/\s]*@", MASK + "@", text)


def tls_context(settings: TlsSettings, path: str) -> ssl.SSLContext:
    """One verified TLS context (TLS 1.2+), unless the configuration says to skip checks.

    A file that cannot be loaded is a ConfigError naming its key."""
    import ssl

    ca_certificate, certificate, key, skip_verification = settings
    is_pem = ca_certificate is not None and "-----BEGIN" in ca_certificate
    try:
        context = ssl.create_default_context(cafile=None if is_pem else ca_certificate,
                                             cadata=ca_certificate if is_pem else None)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise ConfigError(path + ".caCertificate", "cannot load: %s" % file_problem(error)) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if skip_verification:
        context.check_hostname = False  # must come before verify_mode = CERT_NONE
        context.verify_mode = ssl.CERT_NONE
    if certificate and key:
        for name, value in (("clientCertificate", certificate), ("clientKey", key)):
            if "-----BEGIN" not in value and not os.path.isfile(value):
                raise ConfigError("%s.%s" % (path, name), "cannot load: no such file")
        try:
            load_client_certificate(context, certificate, key, path + ".clientKey")
        except (OSError, ValueError) as error:
            raise ConfigError(path + ".clientCertificate", "cannot load the client certificate and "
                              "key: %s" % file_problem(error)) from None
    return context


def file_problem(error: BaseException) -> str:
    """Why a certificate or key did not load, without echoing any content."""
    if isinstance(error, OSError) and error.strerror and not hasattr(error, "library"):
        return error.strerror.lower()  # not found, permission denied...
    return str(getattr(error, "reason", None) or "not a valid PEM file")


def load_client_certificate(context: ssl.SSLContext, certificate: str, key: str,
                            key_path: str) -> None:
    """Paths, or inline PEM (ssl reads only files: write them, private, for the moment)."""

    def refuse_passphrase() -> bytes:  # else OpenSSL would prompt on the job's stdin, and wait
        raise ConfigError(key_path, "an encrypted key is not supported: give the key unencrypted")

    if "-----BEGIN" not in certificate and "-----BEGIN" not in key:
        context.load_cert_chain(certificate, key, password=refuse_passphrase)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for name, value in (("certificate.pem", certificate), ("key.pem", key)):
            if "-----BEGIN" in value:
                path = os.path.join(directory, name)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
                    handle.write(value)
                value = path
            paths.append(value)
        context.load_cert_chain(paths[0], paths[1], password=refuse_passphrase)


class ConfiguredProxy(urllib.request.BaseHandler):
    """The client's own proxy, for every request. ProxyHandler would skip it for hosts in
    $NO_PROXY, but that variable is about the environment's proxies, not this one."""

    handler_order = 100  # before the HTTP(S) handlers, as ProxyHandler

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        self.host = urlsplit(url).netloc.rpartition("@")[2]
        credentials = url_credentials(url)
        self.authorization = basic_authorization(*credentials) if credentials else None

    def http_open(self, request: urllib.request.Request) -> None:
        if self.authorization:
            request.add_header("Proxy-Authorization", self.authorization)
        request.set_proxy(self.host, "http")  # https: a CONNECT tunnel through it
        # None: the HTTP(S) handler that follows sends the request through the proxy

    https_open = http_open


def build_opener(client: Client, context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    """An opener for this client: its TLS context, and its proxy (else HTTPS_PROXY/NO_PROXY).

    Assembled by hand: build_opener() would add an HTTPSHandler with a default context even
    for plain HTTP, which loads the whole system CA store (tens of ms on Python 3.12+)."""
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.HTTPHandler(), urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor()]
    if client.proxy is None:
        handlers.append(urllib.request.ProxyHandler())  # the environment's proxies
    elif client.proxy:
        handlers.append(ConfiguredProxy(client.proxy))
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def prepare_tls(clients: list[Client]) -> dict[TlsSettings, ssl.SSLContext]:
    """One TLS context per distinct TLS setting of HTTPS clients (loading CA files is costly)."""
    contexts: dict[TlsSettings, ssl.SSLContext] = {}
    for client in clients:
        settings = client.tls_settings()
        if settings not in contexts and client.uses_tls:
            contexts[settings] = tls_context(settings, client.path)
    return contexts


class Response:
    """What one HTTP exchange gave: a status (or None) and a short reason for the log."""

    __slots__ = ("status", "error", "retry_after", "body", "retryable", "product")

    def __init__(self, status: int | None, error: str = "", retry_after: float | None = None,
                 body: Json = None, retryable: bool = False, product: str = "") -> None:
        self.status = status
        self.error = error
        self.retry_after = retry_after
        self.body = body
        self.retryable = retryable or status in RETRY_STATUSES
        self.product = product  # X-Elastic-Product: Elasticsearch 7.14+ names itself


def open_url(opener: urllib.request.OpenerDirector, method: str, url: str,
             headers: dict[str, str], body: bytes | None, timeout: float) -> Response:
    """The one network call: never raises for network or HTTP failures."""
    import urllib.error

    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with opener.open(request, timeout=timeout) as answer:
            # A delivered document needs no body read: one that trickles must not undo it.
            return Response(answer.status, body=read_json(answer) if method != "PUT" else None,
                            product=answer.headers.get("X-Elastic-Product", ""))
    except urllib.error.HTTPError as error:  # before URLError: it is one
        body = read_json(error)
        return Response(error.code, error_summary(body), retry_after(error.headers), body,
                        product=error.headers.get("X-Elastic-Product", "") if error.headers else "")
    except (OSError, ValueError, EOFError) as error:  # URLError is an OSError
        return transport_failure(error)
    except Exception as error:  # http.client.HTTPException and kin: the peer spoke nonsense
        if isinstance(error, (TypeError, AttributeError, NameError)):
            raise  # a bug of ours, not a network failure
        return Response(None, "connection: %s" % error.__class__.__name__, retryable=True)


def read_json(answer: Any) -> Json:
    """The JSON body of a response, or None (at most ERROR_BODY_LIMIT bytes)."""
    try:
        data = answer.read(ERROR_BODY_LIMIT)
        return json.loads(data.decode("utf-8")) if data else None
    except Exception:  # noqa: BLE001 - a body that is not JSON is no body for us
        return None


def error_summary(body: Json) -> str:
    """"type: reason" from an Elasticsearch error body, or "" when it has none."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        root = error.get("root_cause")
        if not error.get("reason") and isinstance(root, list) and root and isinstance(root[0], dict):
            error = root[0]
        return ("%s: %s" % (error.get("type", "error"), error.get("reason", ""))).strip(": ")
    if isinstance(error, str):  # Elasticsearch 1.x-2.x, and some proxies
        return error
    return ""


def retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from Elasticsearch, not worth a parser


def transport_failure(error: BaseException) -> Response:
    """timeout, tls or connection, in the cause's own words; only a refused certificate is final."""
    import socket
    import ssl
    import urllib.error

    # urllib wraps failures to connect in URLError; an SSLError after the handshake (a TLS 1.3
    # server refusing the client certificate) comes bare, and its own .reason is a string.
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return Response(None, "timeout", retryable=True)
    if isinstance(reason, ssl.SSLCertVerificationError):
        detail = reason.verify_message or reason.reason or "verify failed"
        return Response(None, "tls: certificate verify failed: %s" % detail)
    if isinstance(reason, ssl.SSLError):
        return Response(None, "tls: %s" % (reason.reason or reason.__class__.__name__), retryable=True)
    if isinstance(reason, OSError) and reason.strerror:
        return Response(None, "connection: %s" % reason.strerror.lower(), retryable=True)
    text = str(reason) or reason.__class__.__name__
    return Response(None, "connection: %s" % text, retryable=True)


# ============================================================================ Delivery


def status_text(status: int | None) -> str:
    """An HTTP status as log lines show it: "-" when there was no answer."""
    return "-" if status is None else str(status)


def is_delivered(status: int | None) -> bool:
    """2xx, or 409: create semantics say the document is already there."""
    return status is not None and (200 <= status < 300 or status == 409)


def backoff_delay(round_number: int, time_left: float, random_fraction: float) -> float:
    """Equal jitter: half the exponential step, plus a random half; never past the budget."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** (round_number - 1))
    return min(ceiling / 2 + random_fraction * ceiling / 2, max(time_left, 0.0))


class Outcome:
    """How delivery to one client ended."""

    __slots__ = ("client", "server", "index", "delivered", "status", "attempts", "milliseconds",
                 "error")

    def __init__(self, client: Client, server: str, index: str, delivered: bool,
                 status: int | None, attempts: int, milliseconds: int, error: str) -> None:
        self.client = client
        self.server = server
        self.index = index
        self.delivered = delivered
        self.status = status
        self.attempts = attempts
        self.milliseconds = milliseconds
        self.error = error

    def line(self) -> str:
        """The log line: server, index, outcome, HTTP status, attempts, milliseconds."""
        text = "%s index=%s %s status=%s attempts=%d ms=%d" % (
            self.server, self.index, "delivered" if self.delivered else "failed",
            status_text(self.status), self.attempts, self.milliseconds)
        if self.error and not self.delivered:
            text += " error=" + self.error
        return redact(text, self.client.secrets)


def deliver(client: Client, opener: urllib.request.OpenerDirector, index: str, identifier: str,
            body: bytes, deadline: float, debug: Callable[[str], None],
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep,
            random: Callable[[], float] = lambda: int.from_bytes(os.urandom(2), "big") / 65536,
            ) -> Outcome:
    """Send one document to one client until delivered, refused, or out of time.

    Connection errors, timeouts, 429, 502, 503 and 504 move on to the next node URL;
    after each full round of URLs, back off (honouring Retry-After when it fits)."""
    started = clock()
    server = client.server
    headers = request_headers(client)
    path = request_path(index, identifier, client.es_major_version)
    attempts = 0
    nodes = len(client.urls)
    response = Response(None, "timeout")
    while True:
        time_left = deadline - clock()
        if time_left <= 0:
            break
        position = attempts % nodes
        server = client.urls[position]
        attempts += 1
        # The time left is shared among the nodes not yet tried in this round: a node that
        # accepts and never answers, or trickles its answer, must not take the others' turn.
        share = time_left / (nodes - position)
        if position < nodes - 1:
            response = open_within(share, opener, server + path, headers, body)
        else:
            response = open_url(opener, "PUT", server + path, headers, body, share)
        debug(redact("%s attempt %d: status=%s %s" % (server + path, attempts,
                                                      status_text(response.status), response.error),
                     client.secrets))
        if is_delivered(response.status) or not response.retryable:
            break
        if attempts % nodes:
            continue  # another node of the cluster: try it at once
        time_left = deadline - clock() - MIN_ATTEMPT_TIME  # keep time for one more attempt
        if time_left <= 0:
            break
        delay = backoff_delay(attempts // nodes, time_left, random())
        if response.retry_after is not None and response.retry_after < time_left:
            delay = max(delay, response.retry_after)
        sleep(delay)
    elapsed = int((clock() - started) * 1000)
    delivered = is_delivered(response.status)
    error = response.error
    if response.status == 400 and any(sign in error for sign in WRONG_VERSION_SIGNS):
        error += " (does esMajorVersion %d fit this server? --check tells)" % client.es_major_version
    return Outcome(client, server, index, delivered, response.status, attempts, elapsed, error)


def open_within(share: float, opener: urllib.request.OpenerDirector, url: str,
                headers: dict[str, str], body: bytes) -> Response:
    """open_url for a PUT, given up after `share` seconds even against a server that trickles
    bytes (a socket timeout bounds each read, not the exchange). The attempt left behind may
    still land: create semantics make that a 409 on the next node, not a duplicate."""
    answers: list[Response] = []
    attempt = threading.Thread(target=lambda: answers.append(
        open_url(opener, "PUT", url, headers, body, share)), daemon=True)
    attempt.start()
    attempt.join(share)
    return answers[0] if answers else Response(None, "timeout", retryable=True)


def deliver_all(clients: list[Client], document: dict[str, Json], identifier: str, now: float,
                report: Callable[[Outcome], None], debug: Callable[[str], None]) -> list[Outcome]:
    """Deliver to every client at once; report each outcome as soon as it is known, and a
    client still busy at the end of its budget (plus a margin) as a timeout."""
    # "replace": a job variable that was not UTF-8 reaches us with surrogates; send it mended.
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    moment = time.gmtime(now)
    started = time.monotonic()  # loading CA files is part of each client's budget
    contexts = prepare_tls(clients)
    finished: list[Outcome] = []  # filled by the delivery threads (queue would cost 1.5 ms to import)
    arrived = threading.Condition()

    def put(outcome: Outcome) -> None:
        with arrived:
            finished.append(outcome)
            arrived.notify()

    pending: dict[int, tuple[Outcome, float]] = {}  # id(client): (outcome if late, give-up time)
    for client in clients:
        index = expand_index(client.index_pattern, moment)
        deadline = started + client.timeout
        late = Outcome(client, client.server, index, False, None, 1, 0, "timeout")
        pending[id(client)] = (late, deadline + JOIN_MARGIN)
        thread = threading.Thread(target=deliver_safely, daemon=True, name=client.path, args=(
            client, contexts.get(client.tls_settings()), index, identifier, body, deadline,
            debug, put))
        thread.start()
    outcomes = []
    while pending:
        give_up = min(until for _, until in pending.values())
        with arrived:
            arrived.wait_for(lambda: finished, max(give_up - time.monotonic(), 0))
            arrivals, finished[:] = finished[:], []
        for outcome in arrivals:
            if pending.pop(id(outcome.client), None) is not None:  # else: reported late already
                outcomes.append(outcome)
                report(outcome)
        for key, (late, until) in list(pending.items()):
            if until <= time.monotonic():  # stuck in the kernel, or trickled to: budget spent
                del pending[key]
                late.milliseconds = int((time.monotonic() - started) * 1000)
                outcomes.append(late)
                report(late)
    return outcomes


def deliver_safely(client: Client, context: ssl.SSLContext | None, index: str,
                   identifier: str, body: bytes, deadline: float, debug: Callable[[str], None],
                   put: Callable[[Outcome], None]) -> None:
    """The boundary of one delivery thread: any failure becomes an outcome, never a crash."""
    try:
        outcome = deliver(client, build_opener(client, context), index, identifier, body,
                          deadline, debug)
    except Exception as error:  # noqa: BLE001 - the job must never see our bugs
        outcome = Outcome(client, client.server, index, False, None, 0, 0,
                          "internal error: %s" % error.__class__.__name__)
    put(outcome)


# ============================================================================ Check


def first_answer(client: Client, opener: urllib.request.OpenerDirector) -> tuple[str, Response]:
    """The first node of the client that answers GET / (else the last one tried), and its answer."""
    for base in client.urls:
        root = open_url(opener, "GET", base + "/", request_headers(client), None, client.timeout)
        if root.status is not None:
            break
    return base, root


def check_client(client: Client, opener: urllib.request.OpenerDirector, base: str, root: Response,
                 index: str) -> tuple[bool, str]:
    """Reachability, TLS, authentication, flavour and version, write privilege: nothing written."""
    headers = request_headers(client)
    if root.status is None:
        return False, root.error
    if root.status == 401:
        return False, "authentication failed (401 %s)" % root.error
    flavour, version = server_identity(root)
    # A least-privilege user may not read "/" (403); some builds have no "/" at all (405).
    if root.status != 200 and not (400 <= root.status < 500 and (root.product or root.error)):
        return False, "%s %s  unexpected answer to GET /: %d %s" % (
            flavour, version, root.status, root.error)
    if root.status != 200:  # the node's own description, where the credentials may read it
        nodes = open_url(opener, "GET", base + "/_nodes/_local?filter_path=nodes.*.version",
                         headers, None, client.timeout)
        described = nodes.body.get("nodes") if isinstance(nodes.body, dict) else None
        if isinstance(described, dict) and described:
            version = str(next(iter(described.values())).get("version", version))
    identity = "%s %s" % (flavour, version)
    problem = version_problem(flavour, version, client.es_major_version)
    if problem:
        return False, "%s  %s: %s" % (identity, index, problem)

    if flavour == "opensearch":
        info = open_url(opener, "GET", base + "/_plugins/_security/authinfo", headers, None,
                        client.timeout)
        if info.status == 200:
            return True, "%s  %s: authenticated; write privilege not checked (OpenSearch has no " \
                         "privilege check that writes nothing)" % (identity, index)
        return unchecked(info, identity, index)

    wanted = ["create_doc", "indices:admin/auto_create"]
    query = json.dumps({"index": [{"names": [index], "privileges": wanted}]}).encode()
    answer = open_url(opener, "POST", base + "/_security/user/_has_privileges", headers, query,
                      client.timeout)
    if answer.status == 200 and isinstance(answer.body, dict):
        granted = answer.body.get("index", {}).get(index, {})
        if not granted.get("create_doc"):
            return False, "%s  %s: cannot write (missing create_doc privilege)" % (identity, index)
        if not granted.get("indices:admin/auto_create"):
            return True, "%s  %s: can write (to an existing index only: no privilege to create it, " \
                         "such as auto_configure)" % (identity, index)
        return True, "%s  %s: can write" % (identity, index)
    return unchecked(answer, identity, index)


def version_problem(flavour: str, version: str, es_major_version: int) -> str | None:
    """Why the requests esMajorVersion makes would be refused by this server, or None.

    5 and 6 write typed URLs, which Elasticsearch 8+ and OpenSearch 2+ refuse; Elasticsearch
    5 and 6 need them (and 5 refuses the type "_doc"). 7 still takes typed URLs, deprecated."""
    major = parse_id(version.split(".", 1)[0])
    if major is None:
        return None  # version unknown: nothing to compare
    typed = es_major_version in (5, 6)
    if flavour == "opensearch":
        refused = typed and major >= 2
    else:
        refused = (typed and major >= 8) or (not typed and major <= 6) or (es_major_version, major) == (6, 5)
    if not refused:
        return None
    return "esMajorVersion %d does not fit this server (its requests would be refused): set %d" % (
        es_major_version, major)


def unchecked(answer: Response, identity: str, index: str) -> tuple[bool, str]:
    """The privilege question got no answer: security is off (anyone can write), or a problem."""
    if answer.status == 401:
        return False, "%s  authentication failed (401 %s)" % (identity, answer.error)
    if answer.status is None:
        return False, "%s  %s" % (identity, answer.error)
    if answer.status in (400, 404, 405, 500) and any(
            hint in answer.error.lower() for hint in SECURITY_ABSENT_HINTS):
        return True, "%s  %s: can write (security not enabled)" % (identity, index)
    return False, "%s  %s: cannot check the write privilege (%d %s)" % (
        identity, index, answer.status, answer.error)


def server_identity(root: Response) -> tuple[str, str]:
    """("elasticsearch" or "opensearch", version) from the answer to GET /."""
    version = root.body.get("version") if isinstance(root.body, dict) else None
    if not isinstance(version, dict):
        return ("elasticsearch" if root.product else "unknown flavour"), "version unknown"
    flavour = "opensearch" if version.get("distribution") == "opensearch" else "elasticsearch"
    return flavour, str(version.get("number", "version unknown"))


def check_all(clients: list[Client], now: float, show: Callable[[str], None]) -> bool:
    started = time.monotonic()
    contexts = prepare_tls(clients)
    moment = time.gmtime(now)
    results = [(False, client.server, "timeout") for client in clients]  # (ok, node, text)

    def run(position: int, client: Client) -> None:
        opener = build_opener(client, contexts.get(client.tls_settings()))
        try:
            base, root = first_answer(client, opener)
            index = expand_index(client.index_pattern, moment)
            ok, text = check_client(client, opener, base, root, index)
            results[position] = (ok, base, text)
        except Exception as error:  # noqa: BLE001
            results[position] = (False, client.server, "internal error: %s" % error.__class__.__name__)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread, client in zip(threads, clients):
        requests = len(client.urls) + 2  # GET / per node until one answers, two questions more
        thread.join(max(started + client.timeout * requests + JOIN_MARGIN - time.monotonic(), 0))
    if not clients:
        show("FAIL  no server configured: nothing to check (\"clients\" is empty)")
    for client, (ok, node, text) in zip(clients, results):
        show(redact("%-5s %s  %s" % ("ok" if ok else "FAIL", node, text), client.secrets))
    return bool(clients) and all(ok for ok, _, _ in results)


# ============================================================================ Service mode


def service_port(environ: Environ, warn: Callable[[str], None] = log) -> int:
    for variable in PORT_VARIABLES:
        text = environ.get(variable, "").strip()
        value = parse_id(text)
        if value is not None and 0 < value < 65536:
            return value
        if text:
            warn("warning: $%s=%s is not a TCP port, ignored" % (variable, json.dumps(text[:20])))
    return DEFAULT_SERVICE_PORT


def listen(port: int) -> Any | None:
    """Accept TCP connections on the port so GitLab Runner's health check passes at once."""
    import socket

    try:
        if socket.has_dualstack_ipv6():
            try:
                server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
            except OSError:
                server = socket.create_server(("", port))
        else:
            server = socket.create_server(("", port))
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)  # not the address again
        log("port %d unavailable (%s): health check not answered, tracking goes on" % (port, reason))
        return None

    def accept_forever() -> None:
        while True:
            try:
                connection, _ = server.accept()
                connection.close()  # a TCP connect is all the health check needs
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True, name="health-check").start()
    return server


class Stop(BaseException):
    """Raised in the main thread by SIGTERM or SIGINT (a BaseException, so that no
    "except Exception" on the way, such as log()'s, can swallow it)."""


def stop_on_signals() -> None:
    import signal

    def raise_stop(signum: int, frame: Any) -> None:
        raise Stop(signum)

    signal.signal(signal.SIGTERM, raise_stop)
    signal.signal(signal.SIGINT, raise_stop)


def idle_forever() -> None:
    """Wait for Stop without burning CPU (the wait is interruptible by signals)."""
    forever = threading.Event()
    while True:
        forever.wait(3600)


# ============================================================================ Command line


class Arguments:
    """The parsed command line."""

    __slots__ = ("template", "service", "config", "dry_run", "check", "strict", "quiet", "verbose")

    def __init__(self) -> None:
        self.template: list[str] = []
        self.config: str | None = None
        self.service = self.dry_run = self.check = self.strict = self.quiet = self.verbose = False


class UsageError(Exception):
    """A command line that does not parse (exit code 2)."""


FLAGS = {"--service": "service", "--dry-run": "dry_run", "--check": "check", "--strict": "strict",
         "-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose"}


def parse_arguments(argv: list[str]) -> Arguments | str:
    """The parsed command line, or the text that --help or --version asks for.

    Hand-written rather than argparse: nine options do not need its start-up cost."""
    arguments = Arguments()
    items = iter(argv)
    for item in items:
        if item in ("-h", "--help"):
            return HELP
        if item == "--version":
            return "tracking.py " + __version__
        if item in FLAGS:
            setattr(arguments, FLAGS[item], True)
        elif item == "--config" or item.startswith("--config="):
            arguments.config = item[9:] if "=" in item else next(items, None)
            if not arguments.config or arguments.config.startswith("-"):
                raise UsageError("--config needs a PATH")
            if arguments.config.lstrip()[:1] in ("{", "["):  # never echoed: it may hold secrets
                raise UsageError("--config takes a file path; inline JSON goes in $%s"
                                 % CONFIGURATION_VARIABLE)
        elif item == "--":
            arguments.template.extend(items)
        elif item.startswith("-") and len(item) > 1:
            raise UsageError("unknown option %s" % item)
        else:
            arguments.template.append(item)
    if len(arguments.template) not in (0, 2):
        raise UsageError("expected TEMPLATE_NAME TEMPLATE_VERSION, or neither")
    if not all(item.strip() for item in arguments.template):
        raise UsageError("TEMPLATE_NAME and TEMPLATE_VERSION cannot be empty")
    if arguments.check and (arguments.dry_run or arguments.service):
        raise UsageError("--check goes alone (not with --dry-run or --service)")
    return arguments


def read_configuration(option: str | None, environ: Environ) -> tuple[str | None, str]:
    """(text, source) from --config, $TRACKING_CONFIGURATION (JSON or a path), or config.json."""
    inline = environ.get(CONFIGURATION_VARIABLE, "").strip()
    if option is None and inline[:1] in ("{", "["):
        return inline, CONFIGURATION_VARIABLE
    if option is not None:
        path, source = option, option
    elif inline:  # a GitLab "File" variable: the path of a file holding the JSON
        path, source = inline, "the file named by $%s" % CONFIGURATION_VARIABLE  # never echoed:
        # a value that is neither JSON nor a path may well be a mangled secret
    else:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")
        if not os.path.exists(path):
            return None, "no configuration"
        source = path
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a BOM some editors write
            return handle.read(), source
    except OSError as error:
        raise ConfigError(source, "cannot read: %s" % error.strerror) from None
    except UnicodeDecodeError:
        raise ConfigError(source, "not UTF-8 text") from None


def template_arguments(arguments: Arguments, environ: Environ) -> tuple[str, str]:
    if arguments.template:
        return arguments.template[0], arguments.template[1]
    name = environ.get(TEMPLATE_NAME_VARIABLE, "").strip()
    version = environ.get(TEMPLATE_VERSION_VARIABLE, "").strip()
    if not name or not version:
        raise UsageError("missing TEMPLATE_NAME TEMPLATE_VERSION (arguments, or $%s and $%s)"
                         % (TEMPLATE_NAME_VARIABLE, TEMPLATE_VERSION_VARIABLE))
    return name, version


def dry_run_report(clients: list[Client], document: dict[str, Json], identifier: str,
                   now: float) -> dict[str, Json]:
    """The document and, per client, the exact request, secrets masked."""
    requests = []
    moment = time.gmtime(now)
    for client in clients:
        index = expand_index(client.index_pattern, moment)
        path = request_path(index, identifier, client.es_major_version)
        requests.append({
            "server": client.server, "method": "PUT", "url": client.server + path,
            "index": index, "documentId": identifier,
            "headers": masked_headers(request_headers(client)),
            "timeout": client.timeout, "failover": client.urls[1:],
        })
        if client.proxy is not None:
            requests[-1]["proxy"] = redact(client.proxy, client.secrets) or "none (direct)"
    return {"document": document, "requests": requests}


def log_usage_error(error: UsageError) -> None:
    log("usage error: %s" % error)
    log(USAGE + " (more: --help)")


def main(argv: list[str] | None = None, environ: Environ | None = None) -> int:
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    usage_problem = None
    try:
        arguments = parse_arguments(argv)
    except UsageError as error:
        log_usage_error(error)
        if "--service" not in argv:
            return 2
        # A service that exits makes the runner wait for its port in every job (say, an older
        # image given a newer template's option): listen, send nothing, idle.
        usage_problem, arguments = error, Arguments()
        arguments.service = True
    if isinstance(arguments, str):  # --help or --version
        show(arguments)
        return 0
    quiet, verbose = arguments.quiet, arguments.verbose

    def info(message: str) -> None:
        if not quiet:
            log(message)

    def debug(message: str) -> None:
        if verbose:
            log(message)

    listener = None
    try:
        if arguments.service:
            stop_on_signals()  # before listening: once the port answers, a SIGTERM may follow
            port = service_port(environ, log)  # a warning: shown even with -q
            listener = listen(port)  # the runner's health check is waiting
            if listener is not None:
                debug("service mode: listening on port %d" % port)
        code = run(arguments, environ, info, debug) if usage_problem is None else 0
        if arguments.service:
            idle_forever()
        return code
    except Stop:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - a bug of ours must not fail the job
        log("internal error: %s (please report it)" % error.__class__.__name__)
        return 1 if arguments.strict else 0
    finally:
        if listener is not None:
            listener.close()


def run(arguments: Arguments, environ: Environ, info: Callable[[str], None],
        debug: Callable[[str], None]) -> int:
    """One run of the probe; returns the exit code."""
    if environ.get(DISABLED_VARIABLE, "").strip().lower() in TRUE_VALUES:
        info("disabled by $%s: nothing sent" % DISABLED_VARIABLE)
        if not (arguments.check or arguments.dry_run):  # those two send nothing anyway
            return 0
    now = time.time()
    try:
        text, source = read_configuration(arguments.config, environ)
        debug("configuration: %s" % source)
        clients = load_configuration(text, environ, source, log) if text is not None else []
        if arguments.check:
            if text is None:
                raise ConfigError("", "no configuration to check (--config, $%s or config.json)"
                                  % CONFIGURATION_VARIABLE)
            warn_insecure(clients)
            return 0 if check_all(clients, now, show) else 1
        name, version = template_arguments(arguments, environ)
        document = build_document(environ, name, version, now)
        identifier = document_id(environ, name, os.urandom(16))
        if arguments.dry_run:  # with no configuration at all, just the document
            plan = document if text is None else dry_run_report(clients, document, identifier, now)
            show(json.dumps(plan, indent=2, ensure_ascii=False))
            return 0
        if not clients:
            info("no server configured (%s): nothing sent" % source)
            return 0
        warn_insecure(clients)

        def report(outcome: Outcome) -> None:
            (info if outcome.delivered else log)(outcome.line())

        outcomes = deliver_all(clients, document, identifier, now, report, debug)
    except (ConfigError, UsageError) as error:
        if isinstance(error, UsageError):
            log_usage_error(error)
        else:
            log("configuration error: %s" % error)
        if arguments.service:
            return 0  # the job goes on; the service idles
        return 2
    failed = any(not outcome.delivered for outcome in outcomes)
    return 1 if failed and arguments.strict and not arguments.service else 0


def warn_insecure(clients: list[Client]) -> None:
    for client in clients:
        if client.skip_ssl_verification and client.uses_tls:  # a warning: shown even with -q
            log("warning: %s: TLS certificate verification is disabled (skipSslVerification)"
                % client.server)


if __name__ == "__main__":
    sys.exit(main())
