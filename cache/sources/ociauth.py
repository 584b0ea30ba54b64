"""Registry credentials: a docker ``config.json`` and the Basic / Bearer token challenges.

Credentials come from, first to last: the cache's ``storage`` secret (``.dockerconfigjson``
as a ``kubernetes.io/dockerconfigjson`` Secret holds it, or ``REGISTRY_AUTH_FILE``), the
agent's ``REGISTRY_AUTH_FILE``, ``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json``.
An isolated source (a namespaced cache) reads only its secret's ``.dockerconfigjson``, and
refuses one naming helpers.
In one config, as Docker reads it: ``credHelpers[HOST]`` names a helper for that registry;
else an ``auths`` entry with a login; else ``credsStore`` names the helper for every
registry. A helper is ``docker-credential-NAME get`` on ``PATH`` (ECR, GCR/Artifact
Registry, ACR all ship one): the server on stdin, ``{"Username", "Secret"}`` on stdout, run
with a timeout from the worker thread that opens the source. OAuth2 refresh tokens
(``identitytoken``, a helper's ``<token>`` user) are not exchanged yet.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from nodecache.cache.errors import FetchError
from nodecache.cache.ociref import DOCKER_HUB, is_loopback
from nodecache.cache.sources.base import is_isolated
from nodecache.cache.sources.errors import SourceHttpError

__all__ = [
    "HELPER_TIMEOUT",
    "Challenge",
    "Login",
    "RegistryAuth",
    "find_login",
    "parse_challenge",
    "run_helper",
]

log = logging.getLogger(__name__)
_HUB_KEYS = {"docker.io", "index.docker.io", DOCKER_HUB}
_PARAM = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_TOKEN_MARGIN = 30.0
"""Seconds before a token's expiry at which it is fetched again."""
_DEFAULT_TOKEN_LIFE = 60.0
"""What the token spec says a token without ``expires_in`` lives."""
HELPER_TIMEOUT = 30.0
"""Seconds a credential helper may take (a cloud helper may fetch a token first)."""
_HUB_SERVER = "https://index.docker.io/v1/"
"""What Docker asks a helper for about Docker Hub."""
_NOT_FOUND = "credentials not found"
"""What docker-credential-helpers print when they hold nothing for the server."""

Call = Callable[[str, str, dict[str, str]], tuple[int, object, bytes]]
"""``call(method, url, headers) -> (status, response, body)``: one small request."""


@dataclass(frozen=True)
class Login:
    """Credentials for one registry, as a docker config holds them."""

    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _registry_of(key: str) -> str:
    """``host[:port]`` of a ``config.json`` ``auths`` key (``https://host/v1/`` too)."""
    host = urlsplit(key).netloc if "://" in key else key.partition("/")[0]
    host = host.lower()
    return DOCKER_HUB if host in _HUB_KEYS else host


def _config_texts(credentials: Mapping[str, str]) -> list[tuple[str, str]]:
    """(where, JSON text) of every docker config that may hold the registry's login."""
    out: list[tuple[str, str]] = []
    if credentials.get(".dockerconfigjson"):
        out.append(("the storage secret's .dockerconfigjson", credentials[".dockerconfigjson"]))
    if is_isolated(credentials):
        return out  # never the agent's docker configs
    paths: list[str] = []
    for source in (credentials, os.environ):
        if source.get("REGISTRY_AUTH_FILE"):
            paths.append(source["REGISTRY_AUTH_FILE"])
    docker_config = os.environ.get("DOCKER_CONFIG")
    if docker_config:
        paths.append(os.path.join(docker_config, "config.json"))
    paths.append(str(Path.home() / ".docker" / "config.json"))
    for path in paths:
        try:
            out.append((path, Path(path).read_text()))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise FetchError(f"cannot read registry credentials {path}: {exc.strerror}") from None
    return out


def find_login(registry: str, credentials: Mapping[str, str]) -> Login | None:
    """The login for ``registry`` from the first docker config that has one."""
    for where, text in _config_texts(credentials):
        try:
            config = json.loads(text)
            auths = config.get("auths") or {}
            helpers = config.get("credHelpers") or {}
            store = config.get("credsStore") or ""
        except (ValueError, AttributeError):
            raise FetchError(
                f"registry credentials in {where} are not a docker config.json", permanent=True
            ) from None
        if (helpers or store) and is_isolated(credentials):
            raise FetchError(
                f"{where} names credHelpers or credsStore, which would run the node's "
                "credential helpers (and its cloud identity) for a namespaced cache: give "
                "the registry's login in auths instead",
                permanent=True,
            )
        helper = _entry_for(helpers, registry)
        if isinstance(helper, str) and helper:
            login = run_helper(helper, registry, f"credHelpers in {where}")
            if login is not None:
                return login
            continue
        entry = _entry_for(auths, registry)
        if isinstance(entry, dict) and (_has_login(entry) or not store):
            return _login(entry, where)
        if store:
            login = run_helper(str(store), registry, f"credsStore in {where}", required=False)
            if login is not None:
                return login
    return None


def run_helper(name: str, registry: str, named_in: str, *, required: bool = True) -> Login | None:
    """``docker-credential-NAME get`` for ``registry``: its login, or None when it holds
    none. Blocking (at most :data:`HELPER_TIMEOUT`); its errors never show its output.

    A helper named for this registry (``credHelpers``) must exist; a ``credsStore`` that is
    missing (a desktop's ``desktop`` or ``osxkeychain`` in a copied config) is logged and
    pulls go on without a login, as they would for a public image."""
    program = f"docker-credential-{name}"
    if "/" in name or not shutil.which(program):
        if not required:
            log.warning("credential helper %s (%s) is not on PATH; ignored", program, named_in)
            return None
        raise FetchError(f"credential helper {program} ({named_in}) is not on PATH", permanent=True)
    server = _HUB_SERVER if registry == DOCKER_HUB else registry
    try:
        done = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"credential helper {program} did not answer for {registry} within "
            f"{HELPER_TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:
        raise FetchError(f"cannot run credential helper {program}: {exc.strerror}") from None
    if done.returncode:
        if _NOT_FOUND in (done.stdout + done.stderr).decode(errors="replace").lower():
            return None
        raise FetchError(
            f"credential helper {program} failed for {registry} (exit {done.returncode}); "
            f"try: echo {server} | {program} get",
            permanent=True,
        )
    try:
        answer = json.loads(done.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise FetchError(
            f"credential helper {program} answered no JSON {{Username, Secret}} for {registry}",
            permanent=True,
        ) from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise FetchError(
            f"credential helper {program} answered no JSON {{Username, Secret}} for {registry}",
            permanent=True,
        )
    if username == "<token>":
        raise FetchError(
            f"credential helper {program} gave an identity token for {registry}; exchanging "
            "those is not supported yet: store a username and password or access token",
            permanent=True,
        )
    return Login(username, secret)


def _entry_for(table: object, registry: str) -> Any:
    """The value of a config table (``auths``, ``credHelpers``) for ``registry``."""
    if isinstance(table, dict):
        for key, value in table.items():
            if _registry_of(str(key)) == registry:
                return value
    return None


def _has_login(entry: dict[str, object]) -> bool:
    return bool(entry.get("auth") or entry.get("username") or entry.get("password"))


def _login(entry: dict[str, object], where: str) -> Login:
    username, password = entry.get("username"), entry.get("password")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise FetchError(
                f"an 'auth' entry in {where} is not base64 of user:password", permanent=True
            ) from None
        username, _, password = decoded.partition(":")
    return Login(str(username or ""), str(password or ""))


@dataclass(frozen=True)
class Challenge:
    """A ``WWW-Authenticate`` header: its scheme and parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header (registries send one)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


class RegistryAuth:
    """The ``Authorization`` header for one registry and repository, learnt from its
    challenge and renewed when a token runs out or is refused. Thread-safe."""

    def __init__(self, registry: str, repository: str, login: Login | None, call: Call) -> None:
        self.registry = registry
        self.repository = repository
        self.login = login
        self.call = call
        self.lock = threading.Lock()
        self.header: str | None = None
        self.expires = float("inf")
        self.challenge: Challenge | None = None

    def headers(self) -> dict[str, str]:
        """What to send with the next request (nothing before a challenge)."""
        with self.lock:
            if self.header and self.challenge and time.monotonic() >= self.expires:
                self._answer(self.challenge)
            return {"Authorization": self.header} if self.header else {}

    def challenged(self, header: str | None, sent: str | None) -> None:
        """A 401 answered a request that carried ``sent``: learn how to authenticate, or
        raise if the credentials we have were the ones refused."""
        challenge = parse_challenge(header)
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            raise SourceHttpError(401, "UNAUTHORIZED", "the registry refused the request")
        with self.lock:
            if sent is not None and sent != self.header:
                return  # another thread already renewed it
            if sent is not None and challenge.scheme == "basic":
                raise self._refused()
            self.challenge = challenge
            self._answer(challenge)

    def _refused(self) -> SourceHttpError:
        if self.login is None:
            return SourceHttpError(
                401,
                "UNAUTHORIZED",
                f"{self.registry} asks for credentials and no docker config has a login "
                "for it (REGISTRY_AUTH_FILE, DOCKER_CONFIG or the storage secret)",
            )
        return SourceHttpError(
            401, "UNAUTHORIZED", f"{self.registry} refused the login for it (wrong credentials?)"
        )

    def _answer(self, challenge: Challenge) -> None:
        if challenge.scheme == "basic":
            if self.login is None:
                raise self._refused()
            self.header, self.expires = self.login.basic(), float("inf")
            return
        token, life = self._token(challenge.params)
        self.header = f"Bearer {token}"
        self.expires = time.monotonic() + max(life - _TOKEN_MARGIN, life / 2)

    def _token(self, params: dict[str, str]) -> tuple[str, float]:
        """A token from the challenge's realm, for pulling this repository."""
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SourceHttpError(401, "UNAUTHORIZED", "the registry's token realm is not a URL")
        query = {"scope": f"repository:{self.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"User-Agent": "nodecache", "Accept": "application/json"}
        secure = parts.scheme == "https" or is_loopback(parts.hostname)
        if self.login is not None and secure:  # never a password in clear over a network
            headers["Authorization"] = self.login.basic()
        sep = "&" if parts.query else "?"
        status, _resp, body = self.call("GET", realm + sep + urlencode(query), headers)
        if status in (401, 403):
            raise self._refused()
        if status != 200:
            raise SourceHttpError(status, "", "the registry's token service failed")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            life = float(answer.get("expires_in") or _DEFAULT_TOKEN_LIFE)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceHttpError(502, "", "the registry's token service answered no token")
        return token, life
