"""A local stand-in for gcr.io/distroless/python3-debian13:nonroot, and the podman set-up the image tests use.

Usage: python tests/imagebase.py [--refresh] [--print-env]

Distroless is built from Debian packages unpacked without their maintainer scripts: no shell, no
``.pyc`` files in the standard library, a CA bundle made from ca-certificates' files, a
``nonroot`` user (uid 65532).  This module does the same from Debian 13 ("trixie") packages fetched
with a private apt configuration (the host's apt state is never touched) and imports the result
with ``podman import`` as ``BASE_IMAGE``.

Everything lives under one cache directory, ``$TRACKING_PROBE_CACHE`` or
``~/.cache/tracking-probe``, outside the repository:

    apt/          sources, lists and downloaded .deb files (kept: later runs download nothing new)
    containers.conf, storage.conf, storage/   podman's and buildah's configuration and storage

``ensure_base()`` is idempotent: when the tagged image carries the label of the same package set,
it returns at once without touching the network.  ``podman_env()`` is the environment every
podman/buildah call of the tests uses.  Needs root, dpkg-deb, ldconfig, apt-get and podman.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BASE_IMAGE = "localhost/tracking-probe/python3-debian13:nonroot"
NONROOT_UID = 65532
RECIPE_VERSION = "1"  # bump when the rootfs assembly changes, to rebuild the cached image
ARCH = "amd64"
MIRRORS = (
    "http://deb.debian.org/debian trixie main",
    "http://deb.debian.org/debian trixie-updates main",
    "http://deb.debian.org/debian-security trixie-security main",
)
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# The package lists of distroless' static, base, cc and python3 images for debian13
# (GoogleContainerTools/distroless base/, cc/, python3/config.bzl), plus what libssl3t64 and
# libpython3.13-stdlib depend on in trixie.  Dependencies are not resolved on purpose: like
# distroless, the image holds exactly these packages.
PACKAGES = (
    # static
    "base-files", "netbase", "tzdata", "media-types", "ca-certificates",
    # base
    "libc6", "libssl3t64", "libzstd1", "openssl-provider-legacy",
    # cc
    "libgcc-s1", "libgomp1", "libstdc++6",
    # python3
    "libbz2-1.0", "libdb5.3t64", "libexpat1", "liblzma5", "libsqlite3-0", "libuuid1",
    "libncursesw6", "libtinfo6", "zlib1g", "libcom-err2", "libcrypt1", "libgssapi-krb5-2",
    "libk5crypto3", "libkeyutils1", "libkrb5-3", "libkrb5support0", "libnsl2",
    "libreadline8t64", "libtirpc3t64", "libffi8", "libpython3.13-minimal",
    "libpython3.13-stdlib", "python3.13-minimal", "python3.13-venv",
)  # fmt: skip

ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "LANG": "C.UTF-8",
}
PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n"
NSSWITCH = (
    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    "networks: files\nprotocols: files\nservices: files\n"
)
SHELLS = ("sh", "bash", "dash", "ash", "zsh", "busybox")


# ==== Locations and the podman environment


def cache_dir() -> Path:
    """The cache root: $TRACKING_PROBE_CACHE, else ~/.cache/tracking-probe."""
    root = os.environ.get("TRACKING_PROBE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tracking-probe"
    )
    return Path(root)


def podman_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ plus CONTAINERS_CONF/CONTAINERS_STORAGE_CONF under the cache (files written once).

    containers.conf: runc (crun fails in this sandbox), no default ulimits (they fail too),
    cgroupfs; the storage stays in the cache so the base image and build cache survive runs.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "containers.conf"
    storage = root / "storage.conf"
    wanted_conf = (
        "# written by tests/imagebase.py\n"
        "[containers]\n"
        "default_ulimits = []\n"
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'runtime = "runc"\n'
        'events_logger = "file"\n'
    )
    wanted_storage = (
        "# written by tests/imagebase.py\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{root / "storage"}"\n'
        f'runroot = "{root / "run"}"\n'
    )
    for path, text in ((conf, wanted_conf), (storage, wanted_storage)):
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    env = dict(os.environ if environ is None else environ)
    env["CONTAINERS_CONF"] = str(conf)
    env["CONTAINERS_STORAGE_CONF"] = str(storage)
    return env


def missing_tools() -> str | None:
    """A one-line reason why images cannot be built and run here, or None."""
    if sys.platform != "linux":
        return "image tests need Linux"
    if os.geteuid() != 0:
        return "image tests need root (podman/buildah with runc, chroot isolation)"
    for tool in ("podman", "buildah", "runc", "dpkg-deb", "apt-get", "ldconfig"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (.ci/run installs podman buildah runc)"
    return None


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """subprocess.run with text output, the podman environment, and the stderr in the error."""
    kwargs.setdefault("env", podman_env())
    kwargs.setdefault("capture_output", True)
    proc = subprocess.run(args, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0 and kwargs.get("check", True) is not False:
        raise RuntimeError(
            f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout or ''}{proc.stderr or ''}"
        )
    return proc  # type: ignore[no-any-return]


# ==== Debian packages through a private apt configuration


def _apt_options(apt: Path) -> list[str]:
    return [
        f"-oDir::Etc::SourceList={apt / 'sources.list'}",
        f"-oDir::Etc::SourceParts={apt / 'sources.list.d'}",
        f"-oDir::Etc::PreferencesParts={apt / 'preferences.d'}",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::State::status={apt / 'status'}",
        f"-oDir::Cache={apt / 'cache'}",
        f"-oAPT::Architecture={ARCH}",
        f"-oAPT::Architectures::={ARCH}",
        "-oAcquire::Languages=none",
        "-oquiet=1",
    ]


def download_packages(refresh: bool = False) -> list[Path]:
    """Download PACKAGES from trixie into <cache>/apt/debs; return the .deb files to use.

    Re-uses the lists younger than a day and every .deb already there.
    """
    apt = cache_dir() / "apt"
    debs = apt / "debs"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d", "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    sources = "".join(f"deb [signed-by={KEYRING}] {line}\n" for line in MIRRORS)
    if not (apt / "sources.list").exists() or (apt / "sources.list").read_text() != sources:
        (apt / "sources.list").write_text(sources)
        refresh = True
    options = _apt_options(apt)
    stamp = apt / "lists" / ".updated"
    if refresh or not stamp.exists() or time.time() - stamp.stat().st_mtime > 86400:
        run(["apt-get", *options, "update"], env=dict(os.environ))
        stamp.touch()
    # one line per package: 'URI' FILENAME SIZE SHA256:...
    uris = run(["apt-get", *options, "download", "--print-uris", *PACKAGES], env=dict(os.environ))
    wanted = [line.split()[1] for line in uris.stdout.splitlines() if line.startswith("'")]
    if len(wanted) != len(PACKAGES):
        raise RuntimeError(f"apt-get resolved {len(wanted)} of {len(PACKAGES)} packages:\n{uris.stdout}")
    missing = [
        name for name, filename in zip(PACKAGES, wanted) if not (debs / filename).exists()
    ]
    if missing:
        run(["apt-get", *options, "download", *missing], cwd=debs, env=dict(os.environ))
    return [debs / filename for filename in wanted]


# ==== The root file system


def _merge_usr(rootfs: Path) -> None:
    """/bin, /sbin, /lib, /lib64 as symlinks into /usr (merged /usr, as distroless has)."""
    for name in ("bin", "sbin", "lib", "lib64"):
        top, usr = rootfs / name, rootfs / "usr" / name
        usr.mkdir(parents=True, exist_ok=True)
        if top.is_dir() and not top.is_symlink():
            for child in top.iterdir():
                shutil.move(str(child), str(usr / child.name))
            top.rmdir()
        if not top.is_symlink():
            top.symlink_to(f"usr/{name}")


def _ca_bundle(rootfs: Path) -> None:
    """/etc/ssl/certs/ca-certificates.crt: every certificate ca-certificates ships, concatenated.

    This is what update-ca-certificates (a shell script, never run here) and distroless' cacerts
    rule produce.
    """
    certs = sorted((rootfs / "usr/share/ca-certificates").rglob("*.crt"))
    if not certs:
        raise RuntimeError("ca-certificates shipped no certificate")
    bundle = rootfs / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_text("".join(c.read_text().rstrip("\n") + "\n" for c in certs))


def assemble_rootfs(debs: list[Path], rootfs: Path) -> None:
    """Unpack the packages (dpkg-deb -x: no maintainer scripts) and add what distroless adds."""
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(rootfs)], env=dict(os.environ))
    _merge_usr(rootfs)
    for alias in ("python3", "python"):
        link = rootfs / "usr/bin" / alias
        if not link.exists():
            link.symlink_to("python3.13")
    etc = rootfs / "etc"
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    (etc / "nsswitch.conf").write_text(NSSWITCH)
    (etc / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    _ca_bundle(rootfs)
    for path, mode in (("tmp", 0o1777), ("root", 0o700), ("home/nonroot", 0o700)):
        (rootfs / path).mkdir(parents=True, exist_ok=True)
        (rootfs / path).chmod(mode)
    # the dynamic linker cache, as distroless' debian13 images ship one (host ldconfig, -r chroot)
    run(["ldconfig", "-r", str(rootfs)], env=dict(os.environ))
    for shell in SHELLS:
        for where in ("usr/bin", "usr/sbin"):
            if (rootfs / where / shell).exists():
                raise RuntimeError(f"a shell slipped into the base: /{where}/{shell}")
    leftovers = list((rootfs / "usr/lib/python3.13").rglob("*.pyc"))
    if leftovers:
        raise RuntimeError(f"the Debian packages shipped .pyc files: {leftovers[:3]}")


def _owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Everything root-owned, except the nonroot user's home."""
    nonroot = info.name in ("home/nonroot", "./home/nonroot")
    info.uid = info.gid = NONROOT_UID if nonroot else 0
    info.uname = info.gname = "nonroot" if nonroot else "root"
    return info


def package_key(debs: list[Path]) -> str:
    """What the cached image was built from: the recipe version and the .deb file names."""
    text = json.dumps([RECIPE_VERSION, sorted(d.name for d in debs), PASSWD, sorted(ENV.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ==== The image


def image_label(image: str, label: str) -> str | None:
    """The value of a label of a local image, or None when the image is absent."""
    proc = run(
        ["podman", "image", "inspect", "--format", "{{json .Labels}}", image], check=False
    )
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout.strip() or "null") or {}
    value = labels.get(label)
    return None if value is None else str(value)


def ensure_base(refresh: bool = False, image: str = BASE_IMAGE) -> str:
    """Build and tag the base image unless an identical one is there; return its name."""
    manifest = cache_dir() / "base-manifest.json"
    if not refresh and manifest.exists():
        recorded = json.loads(manifest.read_text())
        label = image_label(image, "tracking-probe.base-key")
        if recorded.get("image") == image and label == recorded.get("key"):
            return image
    debs = download_packages(refresh=refresh)
    key = package_key(debs)
    if image_label(image, "tracking-probe.base-key") != key:
        with tempfile.TemporaryDirectory(prefix="tracking-base-", dir=cache_dir()) as tmp:
            rootfs = Path(tmp) / "rootfs"
            rootfs.mkdir()
            assemble_rootfs(debs, rootfs)
            tarball = Path(tmp) / "rootfs.tar"
            with tarfile.open(tarball, "w") as tar:
                for child in sorted(rootfs.iterdir()):
                    tar.add(child, arcname=child.name, filter=_owner)
            changes = [f"ENV {name}={value}" for name, value in ENV.items()]
            changes += [
                f"USER {NONROOT_UID}",
                "WORKDIR /home/nonroot",
                'ENTRYPOINT ["/usr/bin/python3.13"]',
                f"LABEL tracking-probe.base-key={key}",
                "LABEL org.opencontainers.image.description=local equivalent of "
                "gcr.io/distroless/python3-debian13:nonroot",
            ]
            args = ["podman", "import"]
            for change in changes:
                args += ["--change", change]
            run([*args, str(tarball), image])
    manifest.write_text(json.dumps({"image": image, "key": key, "debs": [d.name for d in debs]}, indent=1))
    return image


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refresh", action="store_true", help="update the package lists and rebuild")
    parser.add_argument("--print-env", action="store_true",
                        help="print the CONTAINERS_CONF and CONTAINERS_STORAGE_CONF exports")
    options = parser.parse_args()
    reason = missing_tools()
    if reason:
        sys.exit(f"imagebase: {reason}")
    started = time.monotonic()
    name = ensure_base(refresh=options.refresh)
    print(f"{name} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    if options.print_env:
        env = podman_env()
        for var in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
            print(f"export {var}={env[var]}")
