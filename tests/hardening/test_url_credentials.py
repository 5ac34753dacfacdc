"""Issue 18 item 17: credentials embedded in a URL are never printed: not by huggingface_hub's retry warnings
(``HF_ENDPOINT=http://user:token@host``), not in dsbuild's own errors (``oci://user:pass@host/...``), not in a
``-v`` traceback."""

from __future__ import annotations

import io
import logging
import socket

import pytest

from builder import redact
from tests.hardening import record
from tests.hardening.test_bad_inputs import assert_one_sentence
from tests.support.hub_server import Faults, served_repo

TOKEN = "hf_URLplantedTOKEN5e4d3c2b1a"
PASSWORD = "reg-URL-pw-77c1"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
def test_huggingface_hub_retry_warnings_do_not_show_hf_endpoint_credentials(dsbuild, tmp_path, tiny_ckpt,
                                                                           hub_server):
    """The hub answers 429 twice to a shard and once to config.json with HF_ENDPOINT carrying user-info; the fetch
    retries and succeeds, and the token is printed nowhere (the library's own log lines: the filter tests below)."""
    repo = served_repo("acme/creds", tiny_ckpt)
    shard = sorted(p for p in repo.files if p.endswith(".safetensors"))[0]
    repo.faults = Faults(error429_times={shard: 2, "config.json": 1})
    hub_server.add(repo)
    endpoint = hub_server.url.replace("http://", f"http://carol:{TOKEN}@")
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = dsbuild("fetch", "--model", "acme/creds", "--out", "build/r", "-v", env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in out
    # The 429s were answered (and retried): dsbuild's retry lines and any library line went by without the token.
    assert repo.faults.error429_times[shard] == 0 and repo.faults.error429_times["config.json"] == 0
    assert TOKEN not in (tmp_path / "build" / "r" / "manifest.json").read_text()
    record.add("secrets", "hf-endpoint-user-info-in-retry-warnings", item=17,
               retry_lines=proc.stderr.count("thrown while requesting"), token_seen=0)


CARRIES = "carries credentials; dsbuild takes them from DSBUILD_REGISTRY_USER"
CLI_CASES = [
    ("pull-reference-with-password", ["pull", f"oci://carol:{PASSWORD}@127.0.0.1:{{port}}/team/run:v1", "dest",
                                      "--plain-http"], 10, "reference 'oci://***@127.0.0.1:"),
    ("pull-reference-password-with-at-sign", ["pull", f"oci://carol:{PASSWORD}@x@127.0.0.1:{{port}}/team/run:v1",
                                              "dest", "-v"], 10, CARRIES),
    ("push-reference-with-password", ["push", "run", f"oci://carol:{PASSWORD}@127.0.0.1:{{port}}/team/run:v1",
                                      "--plain-http", "-v"], 10, CARRIES),
    ("push-reference-user-only", ["push", "run", "oci://carol@127.0.0.1:{port}/team/run:v1"], 10, CARRIES),
    ("fetch-unreachable-endpoint-with-token", ["fetch", "--model", "acme/creds", "--out", "build/r", "-v"], 4,
     "cannot reach the hub at http://127.0.0.1:"),
]


@pytest.mark.parametrize("name,args,code,words", [pytest.param(*c, id=c[0]) for c in CLI_CASES])
def test_dsbuild_errors_never_repeat_url_credentials(dsbuild, tmp_path, name, args, code, words):
    from tests.support.runs import synthetic_run

    synthetic_run(tmp_path / "run", write_manifest=True)
    port = _closed_port()
    env = {"HF_ENDPOINT": f"http://carol:{TOKEN}@127.0.0.1:{port}", "HF_HUB_ETAG_TIMEOUT": "1",
           "HF_HUB_DOWNLOAD_TIMEOUT": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = dsbuild(*[a.replace("{port}", str(port)) for a in args], env=env, timeout=300)
    if "-v" in args:  # the traceback is shown, and redacted too
        assert "Traceback" in proc.stderr
        message = proc.stderr.strip().splitlines()[-1]
    else:
        message = assert_one_sentence(proc, name)
    assert proc.returncode == code, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr and TOKEN not in proc.stdout + proc.stderr
    assert words in message, message
    record.add("bad_inputs", name, exit_code=proc.returncode, message=message, item=17)


# --- the filter itself -------------------------------------------------------------------------------------------

@pytest.fixture
def hf_handler_output():
    """What huggingface_hub's own StreamHandler (on the library's root logger) prints."""
    import huggingface_hub.utils.logging  # noqa: F401 -- adds the handler

    handler = logging.getLogger("huggingface_hub").handlers[0]
    buffer = io.StringIO()
    old = handler.setStream(buffer)
    try:
        yield buffer
    finally:
        handler.setStream(old)


def test_records_from_any_library_logger_are_redacted_where_they_are_emitted(hf_handler_output):
    redact.install()
    url = f"http://carol:{TOKEN}@127.0.0.1:9/acme/x/resolve/main/config.json"
    logging.getLogger("huggingface_hub.utils._http").warning(f"HTTP Error 429 thrown while requesting GET {url}")
    logging.getLogger("huggingface_hub.utils._http").warning("'%s' thrown while requesting %s %s",
                                                             ConnectionError(f"cannot connect to {url}"), "GET", url)
    # A module logger created after install(): the handler-level filter still sees it.
    logging.getLogger("huggingface_hub.some_new_module").warning("fetching %s", url)
    try:
        raise OSError(f"Consistency check failed for {url}")
    except OSError:
        logging.getLogger("huggingface_hub.file_download").exception("download of %s failed", url)
    printed = hf_handler_output.getvalue()
    assert printed.count("http://***@127.0.0.1:9/acme") == 6, printed
    assert TOKEN not in printed
    record.add("secrets", "url-credential-log-filter", item=17, lines=printed.count("\n"), token_seen=0)


@pytest.mark.parametrize("text,want", [
    ("GET http://u:p@h/x", "GET http://***@h/x"),
    ("oci://u:p@ss@reg.io:5000/x:1", "oci://***@reg.io:5000/x:1"),
    ("'https://tok@huggingface.co/api' and http://a:b@c/?q=x@y", "'https://***@huggingface.co/api' and http://***@c/?q=x@y"),
    ("https://huggingface.co/acme/x@main and user@example.com", "https://huggingface.co/acme/x@main and user@example.com"),
    ("HTTPS://U:P@H", "HTTPS://***@H"),
])
def test_redact_urls(text, want):
    assert redact.redact_urls(text) == want


def test_no_library_logger_is_left_unfiltered_after_install():
    import huggingface_hub  # noqa: F401
    import httpx  # noqa: F401

    redact.install()
    loggers = {n: lg for n, lg in logging.root.manager.loggerDict.items()
               if isinstance(lg, logging.Logger) and n.split(".")[0] in redact.LIBRARIES}
    assert "huggingface_hub.utils._http" in loggers
    unfiltered = [n for n, lg in loggers.items() if redact._FILTER not in lg.filters]
    assert not unfiltered, unfiltered
