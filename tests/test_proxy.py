"""Proxies: an explicit one per client, else the standard HTTPS_PROXY/HTTP_PROXY/NO_PROXY."""

from __future__ import annotations

from conftest import SECRET, probe_env, run_probe, write_config


def test_explicit_proxy_carries_http(standin, proxy, tmp_path):
    config = write_config(tmp_path, {"url": standin.url, "proxy": proxy.url})
    result = run_probe("maven", "1", "--config", config)
    assert "delivered status=201" in result.stderr
    assert proxy.targets and proxy.targets[0].startswith("PUT %s/" % standin.url)


def test_explicit_proxy_tunnels_https(standin_factory, certificates, proxy, tmp_path):
    https = standin_factory(certificates.server_context())
    config = write_config(tmp_path, {"url": https.url, "proxy": proxy.url,
                                     "caCertificate": certificates.ca_path})
    result = run_probe("maven", "1", "--config", config)
    assert "delivered status=201" in result.stderr, result.stderr
    assert proxy.targets == ["CONNECT %s" % https.url.split("://")[1]]


def test_environment_proxy_applies_by_default(standin, proxy, tmp_path):
    config = write_config(tmp_path, {"url": standin.url})
    result = run_probe("maven", "1", "--config", config, env=probe_env(HTTP_PROXY=proxy.url))
    assert "delivered status=201" in result.stderr
    assert len(proxy.targets) == 1


def test_no_proxy_bypasses_the_environment_proxy(standin, proxy, tmp_path):
    config = write_config(tmp_path, {"url": standin.url})
    env = probe_env(HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1")
    assert "delivered status=201" in run_probe("maven", "1", "--config", config, env=env).stderr
    assert proxy.targets == []


def test_empty_proxy_means_direct_even_with_the_environment(standin, proxy, tmp_path):
    config = write_config(tmp_path, {"url": standin.url, "proxy": ""})
    env = probe_env(HTTP_PROXY=proxy.url)
    assert "delivered status=201" in run_probe("maven", "1", "--config", config, env=env).stderr
    assert proxy.targets == []


def test_proxy_credentials_never_show(standin, proxy, tmp_path):
    url = proxy.url.replace("http://", "http://user:%s@" % SECRET)
    config = write_config(tmp_path, {"url": standin.url, "proxy": url})
    result = run_probe("maven", "1", "--config", config, "-v")
    assert "delivered" in result.stderr
    result = run_probe("--dry-run", "maven", "1", "--config", config)
    assert result.returncode == 0


def test_an_explicit_proxy_applies_even_to_hosts_in_no_proxy(standin, proxy, tmp_path):
    config = write_config(tmp_path, {"url": standin.url, "proxy": proxy.url})
    env = probe_env(NO_PROXY="127.0.0.1,localhost")
    assert "delivered status=201" in run_probe("maven", "1", "--config", config, env=env).stderr
    assert len(proxy.targets) == 1
