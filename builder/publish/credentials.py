"""Registry credentials from the places docker and oras look, in this order:

1. ``DSBUILD_REGISTRY_USER`` / ``DSBUILD_REGISTRY_PASSWORD`` (both, or neither);
2. the docker config (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``): ``credHelpers[host]``,
   then ``auths[host].auth`` (base64 ``user:password``), then ``credsStore`` — each helper run as
   ``docker-credential-<name> get`` with the host on stdin, answering ``{"Username", "Secret"}``.

Credentials are looked up only when a registry asks for them (a 401), never logged, and their ``repr`` hides the
secret so that no traceback or debug print shows it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from builder.errors import RegistryError

USER_ENV = "DSBUILD_REGISTRY_USER"
PASSWORD_ENV = "DSBUILD_REGISTRY_PASSWORD"
HELPER_TIMEOUT_S = 30


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str  # where they came from, for messages ("DSBUILD_REGISTRY_USER", "~/.docker/config.json auths")

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    return Path(env.get("HOME", str(Path.home()))) / ".docker" / "config.json"


def _host_keys(registry: str) -> list[str]:
    # docker writes auths keys as bare hosts or as URLs (``https://host``, ``https://host/v1/`` for Docker Hub).
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/", f"https://{registry}/v2/"]


def _from_helper(name: str, registry: str, *, config: Path, path_var: str | None) -> Credentials | None:
    binary = f"docker-credential-{name}"
    found = shutil.which(binary, path=path_var)
    try:
        if found is None:
            raise FileNotFoundError(binary)
        proc = subprocess.run([found, "get"], input=registry.encode(), capture_output=True, timeout=HELPER_TIMEOUT_S)
    except FileNotFoundError:
        raise RegistryError(f"{config} names credential helper {binary!r} for {registry}, but it is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise RegistryError(f"credential helper {binary} did not answer within {HELPER_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        # Helpers answer "credentials not found in native keychain" for unknown hosts: that means anonymous.
        if b"not found" in proc.stdout.lower() or b"not found" in proc.stderr.lower():
            return None
        raise RegistryError(f"credential helper {binary} failed for {registry} (exit {proc.returncode})")
    try:
        payload = json.loads(proc.stdout)
        username, secret = payload["Username"], payload["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"credential helper {binary} gave an answer that is not {{Username, Secret}} JSON") from None
    return Credentials(username=username, password=secret, source=binary)


def _from_auth_field(value: str, registry: str, *, config: Path) -> Credentials:
    try:
        username, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise RegistryError(f"{config}: auths entry for {registry} is not base64 of user:password") from None
    if not sep:
        raise RegistryError(f"{config}: auths entry for {registry} is not base64 of user:password")
    return Credentials(username=username, password=password, source=f"{config} auths")


def find_credentials(registry: str, *, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials for ``registry`` (``host[:port]``), or None for anonymous access."""
    env = os.environ if environ is None else environ
    user, password = env.get(USER_ENV), env.get(PASSWORD_ENV)
    if user or password:
        if not (user and password):
            raise RegistryError(f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
        return Credentials(username=user, password=password, source=USER_ENV)
    config = docker_config_path(env)
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise RegistryError(f"docker config {config} is not valid JSON") from None
    if not isinstance(data, dict):
        raise RegistryError(f"docker config {config} is not a JSON object")
    helpers = data.get("credHelpers") or {}
    auths = data.get("auths") or {}
    for key in _host_keys(registry):
        if key in helpers:
            return _from_helper(str(helpers[key]), registry, config=config, path_var=env.get("PATH"))
    for key in _host_keys(registry):
        entry = auths.get(key)
        if isinstance(entry, dict) and entry.get("auth"):
            return _from_auth_field(str(entry["auth"]), registry, config=config)
        if isinstance(entry, dict) and entry.get("username") and entry.get("password"):
            return Credentials(username=entry["username"], password=entry["password"], source=f"{config} auths")
    if data.get("credsStore"):
        return _from_helper(str(data["credsStore"]), registry, config=config, path_var=env.get("PATH"))
    return None
