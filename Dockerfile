# The tracking probe as a GitLab CI service container (README.md, "The container image").
#
# Build context: tracking.py and, optionally, config.json (the operator's configuration; the
# pipeline writes and validates it). Configuration and secrets never go through build args:
# they would show in the image history.
#
#   buildah bud --format docker -t tracking-probe .
#   podman run --rm -e CI_JOB_ID=1 tracking-probe --dry-run maven 4.0.0
#
# No shell at run time (distroless), so every instruction is in exec form.

# A build arg so that tests and mirrors can name an equivalent base (tests/imagebase.py builds one).
ARG BASE_IMAGE=gcr.io/distroless/python3-debian13:nonroot
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

LABEL org.opencontainers.image.title="tracking-probe" \
      org.opencontainers.image.description="Indexes one document per GitLab CI job into Elasticsearch/OpenSearch; runs as a GitLab CI service" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Read-only for everyone, owned by root: the probe runs as nonroot and cannot change them.
# "config.jso[n]" is a pattern so that a build without a configuration still works.
COPY --chmod=0444 tracking.py config.jso[n] /app/

# Distroless' standard library has no .pyc files and a non-root process cannot write them, so
# every start would recompile what the probe imports. Compile the probe and every module it
# imports as unchecked-hash .pyc files (valid whatever the file times, so they survive COPY):
# the import statements of tracking.py, read with ast (also those inside functions), what they
# import in turn, and what the standard library imports lazily (host names -> encodings.idna
# -> stringprep; the configuration file is read as utf-8-sig -> encodings.utf_8_sig).
# tests/test_image.py checks that the probe's runs load no module from source.
# -B: the imports done here leave no timestamp .pyc behind.
USER 0
RUN ["/usr/bin/python3.13", "-I", "-B", "-c", "\
import ast, importlib, py_compile, sys\n\
sys.path.insert(0, '/app')\n\
tree = ast.parse(open('/app/tracking.py', encoding='utf-8').read())\n\
imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]\n\
imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level]\n\
modules = [importlib.import_module(name) for name in imported + ['encodings.idna', 'encodings.utf_8_sig', 'tracking']]\n\
files = sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})\n\
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH\n\
compiled = [py_compile.compile(f, doraise=True, invalidation_mode=mode) for f in files if f.endswith('.py')]\n\
print('precompiled', len(compiled), 'modules')\n\
"]
USER 65532

# The service-mode port: GitLab Runner's health check dials exposed ports before the job starts.
EXPOSE 18733

# -I: isolated from the job's environment (no PYTHON* variables, no user site, no cwd on sys.path).
# The probe is imported rather than run as a script so that it, too, loads from its .pyc
# (a script is always compiled from source); config.json is still looked for beside /app/tracking.py.
ENTRYPOINT ["/usr/bin/python3.13", "-I", "-c", "import sys; sys.path.insert(0, '/app'); import tracking; sys.exit(tracking.main())"]
# What runs when a runner drops the service's command: template name and version then come
# from $TRACKING_TEMPLATE_NAME and $TRACKING_TEMPLATE_VERSION.
CMD ["--service"]
