"""Who may read ``/metrics`` and ``/readyz``: a bearer token, or basic-auth users.

``metrics.bearer_token_file`` holds one token (what Prometheus sends with
``authorization: {credentials_file: …}``). ``metrics.web_config`` is a file in the
Prometheus exporter-toolkit format, so the same file works for node_exporter and
empath::

    basic_auth_users:          # user: bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
      prometheus: $2y$10$...
    tls_server_config:         # optional: serve HTTPS
      cert_file: server.crt    # relative paths are relative to this file
      key_file: server.key
      min_version: TLS12       # TLS12 (default) or TLS13
      client_ca_file: ca.crt   # optional, with client_auth_type:
      client_auth_type: RequireAndVerifyClientCert

Both files are secrets: refused when readable by others (empath/secretfile.py), at
start and at reload. Tokens are compared in constant time; a bcrypt check is slow on
purpose, so a good (user, password) pair is remembered (as a SHA-256 of both) and
later scrapes cost a hash, not a bcrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from empath.config.model import MetricsConfig
from empath.secretfile import SecretFileError, read_secret, read_secret_text

__all__ = ["MetricsAuth", "MetricsAuthError", "load_auth"]

_TOP_KEYS = ("basic_auth_users", "tls_server_config", "http_server_config")
_TLS_KEYS = ("cert_file", "key_file", "min_version", "max_version", "client_ca_file",
             "client_auth_type", "cipher_suites", "curve_preferences",
             "prefer_server_cipher_suites")
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_OPTIONAL,
                "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAnyClientCert": ssl.CERT_REQUIRED,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_CACHE_MAX = 64


class MetricsAuthError(ValueError):
    """Names the key and file: ``metrics.web_config /etc/empath/web.yml: …``."""


@dataclass
class MetricsAuth:
    token: bytes | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user → bcrypt hash
    tls: ssl.SSLContext | None = None
    _good: set[bytes] = field(default_factory=set)

    @property
    def required(self) -> bool:
        return self.token is not None or bool(self.users)

    @property
    def challenge(self) -> str:
        """The WWW-Authenticate header of a 401."""
        return 'Basic realm="empath"' if self.users and self.token is None \
            else 'Bearer realm="empath"'

    def check_fast(self, header: str | None) -> bool | None:
        """True/False when decided without bcrypt; None when ``check_bcrypt`` must run."""
        if not self.required:
            return True
        if not header:
            return False
        scheme, _, cred = header.strip().partition(" ")
        scheme = scheme.lower()
        cred = cred.strip()
        if scheme == "bearer":
            return self.token is not None and hmac.compare_digest(
                self.token, cred.encode("utf-8", "replace"))
        if scheme == "basic" and self.users:
            pair = _basic(cred)
            if pair is None or pair[0] not in self.users:
                return False
            return True if _pair_key(*pair) in self._good else None
        return False

    def check_bcrypt(self, header: str) -> bool:
        """The slow path of a basic-auth check (run it in a thread)."""
        import bcrypt

        pair = _basic(header.strip().partition(" ")[2].strip())
        if pair is None or pair[0] not in self.users:
            return False
        user, password = pair
        try:
            ok = bcrypt.checkpw(password, self.users[user])
        except ValueError:  # not a bcrypt hash; load_auth checked the prefix only
            return False
        if ok:
            if len(self._good) >= _CACHE_MAX:
                self._good.clear()
            self._good.add(_pair_key(user, password))
        return bool(ok)


def _basic(cred: str) -> tuple[str, bytes] | None:
    try:
        raw = base64.b64decode(cred, validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", "replace"), password


def _pair_key(user: str, password: bytes) -> bytes:
    return hashlib.sha256(user.encode() + b"\0" + password).digest()


def load_auth(cfg: MetricsConfig) -> MetricsAuth:
    """Read the token file and the web config named in ``cfg``; MetricsAuthError
    names what is wrong. Nothing set: no authentication (bind to loopback)."""
    auth = MetricsAuth()
    try:
        if cfg.bearer_token_file is not None:
            auth.token = read_secret_text(cfg.bearer_token_file,
                                          "metrics.bearer_token_file").encode("utf-8")
        if cfg.web_config is not None:
            _web_config(cfg.web_config, auth)
    except SecretFileError as exc:
        raise MetricsAuthError(str(exc)) from None
    return auth


def _web_config(path: Path, auth: MetricsAuth) -> None:
    where = f"metrics.web_config {path}"
    try:
        data: Any = yaml.safe_load(read_secret(path, "metrics.web_config"))
    except yaml.YAMLError as exc:
        raise MetricsAuthError(f"{where}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MetricsAuthError(f"{where}: the top level must be a mapping")
    for key in data:
        if key not in _TOP_KEYS:
            raise MetricsAuthError(f"{where}: {key}: unknown key (expected one of "
                                   f"{', '.join(_TOP_KEYS)})")
    users = data.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise MetricsAuthError(f"{where}: basic_auth_users: expected a mapping of "
                               "user: bcrypt hash")
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise MetricsAuthError(f"{where}: basic_auth_users.{user}: expected a bcrypt "
                                   "hash ($2y$…)")
        auth.users[str(user)] = hashed.encode("ascii")
    tls = data.get("tls_server_config")
    if tls:
        auth.tls = _tls_context(path, tls)


def _tls_context(path: Path, tls: Any) -> ssl.SSLContext:
    where = f"metrics.web_config {path}: tls_server_config"
    if not isinstance(tls, dict):
        raise MetricsAuthError(f"{where}: expected a mapping")
    for key in tls:
        if key not in _TLS_KEYS:
            raise MetricsAuthError(f"{where}.{key}: unknown key")
    for key in ("cert_file", "key_file"):
        if not isinstance(tls.get(key), str):
            raise MetricsAuthError(f"{where}.{key}: required (a file path)")

    def rel(p: str) -> Path:
        return (path.parent / p) if not Path(p).is_absolute() else Path(p)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    version = tls.get("min_version", "TLS12")
    if version not in _VERSIONS:
        raise MetricsAuthError(f"{where}.min_version: expected TLS12 or TLS13, got {version!r}")
    ctx.minimum_version = _VERSIONS[version]
    key_path = rel(tls["key_file"])
    try:
        read_secret(key_path, "metrics.web_config tls_server_config.key_file")
        ctx.load_cert_chain(str(rel(tls["cert_file"])), str(key_path))
    except SecretFileError as exc:
        raise MetricsAuthError(str(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise MetricsAuthError(f"{where}: cannot load certificate and key: {exc}") from None
    mode = tls.get("client_auth_type", "NoClientCert")
    if mode not in _CLIENT_AUTH:
        raise MetricsAuthError(f"{where}.client_auth_type: unknown value {mode!r}")
    if tls.get("client_ca_file"):
        try:
            ctx.load_verify_locations(str(rel(tls["client_ca_file"])))
        except (OSError, ssl.SSLError) as exc:
            raise MetricsAuthError(f"{where}.client_ca_file: {exc}") from None
    ctx.verify_mode = _CLIENT_AUTH[mode]
    return ctx
