"""How to log in to Redis and over what: ACL user, password and TLS, kept off the URL.

``RedisAuth`` carries what ``redis.asyncio.Redis.from_url`` takes besides the URL: a user
name, a password read from a file or an environment variable (never a command-line
argument, which every process on the host can read), and for ``rediss://`` the CA that
signs the server's certificate and optionally a client certificate. ``redact_url`` is what
any log line or error message shows of a Redis URL: the password replaced by ``***``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any

from contracts.errors import ConfigError
from contracts.redaction import redact_url


class RedisConfigError(ConfigError):
    """A Redis credential or TLS option is missing, unreadable or contradictory."""


@dataclass(frozen=True)
class RedisAuth:
    username: str | None = None  # an ACL user; None: the default user
    password: str | None = field(default=None, repr=False)
    tls_ca_file: Path | None = None  # rediss:// only: CA of the server's certificate
    tls_cert_file: Path | None = None  # rediss:// only: client certificate, when Redis asks
    tls_key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.username is not None and self.password is None:
            raise RedisConfigError("--redis-username needs a password: pass "
                                   "--redis-password-file FILE or --redis-password-env VAR")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise RedisConfigError("--redis-tls-cert and --redis-tls-key go together")
        for flag, path in (("--redis-tls-ca", self.tls_ca_file),
                           ("--redis-tls-cert", self.tls_cert_file),
                           ("--redis-tls-key", self.tls_key_file)):
            if path is not None and not os.access(path, os.R_OK):
                raise RedisConfigError(f"{flag} {path}: cannot read it; check the path and "
                                       "that this user may read it")

    @property
    def tls(self) -> bool:
        return self.tls_ca_file is not None or self.tls_cert_file is not None

    @classmethod
    def from_sources(cls, username: str | None = None, password_file: Path | None = None,
                     password_env: str | None = None, tls_ca_file: Path | None = None,
                     tls_cert_file: Path | None = None, tls_key_file: Path | None = None,
                     environ: Mapping[str, str] = os.environ) -> RedisAuth:
        """The options as given on the command line; the password is read here, once."""
        if password_file is not None and password_env is not None:
            raise RedisConfigError("pass one of --redis-password-file and --redis-password-env")
        password = None
        if password_file is not None:
            password = _read_password(password_file)
        elif password_env is not None:
            password = environ.get(password_env) or None
            if password is None:
                raise RedisConfigError(f"--redis-password-env {password_env}: the variable is "
                                       "unset or empty")
        return cls(username, password, tls_ca_file, tls_cert_file, tls_key_file)

    def client_kwargs(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``Redis.from_url(url, …)``. TLS options need a rediss://
        URL and a password needs a URL without one: no guessing which one wins."""
        parts = urlsplit(url)
        if self.tls and parts.scheme != "rediss":
            raise RedisConfigError(f"--redis-tls-* need a rediss:// URL (got {redact_url(url)}); "
                                   "write rediss://host:port/db")
        if self.password is not None and parts.password:
            raise RedisConfigError(f"the Redis URL already has a password ({redact_url(url)}) "
                                   "and --redis-password-* give another; keep one, preferably "
                                   "the file or variable")
        kwargs: dict[str, Any] = {}
        if self.password is not None:
            kwargs.update(username=self.username, password=self.password)
        if self.tls_ca_file is not None:
            kwargs["ssl_ca_certs"] = str(self.tls_ca_file)
        if self.tls_cert_file is not None:
            kwargs.update(ssl_certfile=str(self.tls_cert_file), ssl_keyfile=str(self.tls_key_file))
        return kwargs


def _read_password(path: Path) -> str:
    try:
        password = Path(path).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise RedisConfigError(f"--redis-password-file {path}: cannot read it "
                               f"({getattr(exc, 'strerror', None) or type(exc).__name__}); "
                               "check the path and that this user may read it") from exc
    if not password:
        raise RedisConfigError(f"--redis-password-file {path}: empty; expected the password")
    return password


