"""``--url`` says the protocol by its scheme; Triton's default ports fill a missing one (issue 21 item 4)."""

from __future__ import annotations

import pytest

from builder.errors import SpecError
from triton_repo.client import Endpoint, endpoint


@pytest.mark.parametrize("url,protocol,expected", [
    ("127.0.0.1:8001", None, Endpoint("grpc", "127.0.0.1:8001")),
    ("127.0.0.1:8000", "http", Endpoint("http", "127.0.0.1:8000")),
    ("http://127.0.0.1:8000", None, Endpoint("http", "127.0.0.1:8000")),
    ("http://127.0.0.1:8000", "http", Endpoint("http", "127.0.0.1:8000")),  # the http://http://
    ("http://127.0.0.1:8000/", None, Endpoint("http", "127.0.0.1:8000")),
    ("HTTPS://triton.example.com", None, Endpoint("http", "triton.example.com:8000", "https")),
    ("grpc://10.0.0.5", None, Endpoint("grpc", "10.0.0.5:8001")),
    ("localhost", None, Endpoint("grpc", "localhost:8001")),
    ("[::1]:9001", None, Endpoint("grpc", "[::1]:9001")),
])
def test_endpoint(url, protocol, expected):
    ep = endpoint(url, protocol)
    assert ep == expected
    if ep.protocol == "http":
        assert ep.http_base.count("://") == 1


@pytest.mark.parametrize("url,protocol,message", [
    ("http://127.0.0.1:8000", "grpc", "is http but --protocol says grpc"),
    ("grpc://127.0.0.1:8001", "http", "is grpc but --protocol says http"),
    ("ftp://127.0.0.1:8001", None, "unknown scheme 'ftp'"),
    ("127.0.0.1:99999", None, "invalid port"),
    ("http://:8000", None, "names no host"),
])
def test_bad_urls(url, protocol, message):
    with pytest.raises(SpecError, match=message):
        endpoint(url, protocol)
