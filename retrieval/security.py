"""Transport security and caller authentication of the gRPC port.

    TlsConfig         the server's certificate and key; with a client CA, every client must
                      present a certificate it signed (mutual TLS). The port is then
                      TLS-only: a plaintext client fails its handshake.
    ClientTls         what a client trusts (CA) and presents (certificate, key)
    TokenSet          bearer tokens by name, from a file or an environment variable;
                      a presented token is compared with every one in constant time
    AuthInterceptor   UNAUTHENTICATED unless the call carries ``authorization: Bearer <token>``
                      with a token of the set, decided from the metadata before the body is
                      parsed. grpc.health.v1.Health stays open, so Kubernetes probes need
                      no token; reflection needs one like any service.

Errors: SecurityConfigError (a ConfigError) names the file or variable and what is wrong
in it; it is raised once, at start, and never contains a secret. What a refused caller
reads is one of two fixed messages (``MISSING_TOKEN``, ``INVALID_TOKEN``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from retrieval.metrics import ServiceMetrics
from contracts.errors import ConfigError

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # method prefixes callable without a token
MISSING_TOKEN = "missing credentials: send metadata 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid credentials"
MIN_TOKEN_CHARS = 16
TOKEN_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class SecurityConfigError(ConfigError):
    """A certificate, key or token source is missing, unreadable or malformed."""


# --- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes of the server's certificate chain and key, and of the CA that signs client
    certificates (None: clients are not asked for one). Build with ``from_files``."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @classmethod
    def from_files(cls, cert_file: Path, key_file: Path,
                   client_ca_file: Path | None = None) -> TlsConfig:
        """Read and check the files now: each must be PEM, and the key must match the
        certificate (a mismatch would otherwise only show as failed handshakes)."""
        cert = _read_pem(cert_file, "--tls-cert", "CERTIFICATE")
        key = _read_pem(key_file, "--tls-key", "PRIVATE KEY")
        ca = _read_pem(client_ca_file, "--tls-client-ca", "CERTIFICATE") if client_ca_file else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise SecurityConfigError(
                f"--tls-key {key_file} does not match --tls-cert {cert_file} ({exc.reason}); "
                "pass the key the certificate was issued for") from exc
        return cls(cert, key, ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.mutual)


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts and presents. ``ca`` None: the system's trust store.
    ``server_name``: the name to check the server's certificate against when it differs
    from the host dialled (e.g. dialling 127.0.0.1 of a pod whose certificate names the
    service)."""

    ca: bytes | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca_file: Path | None = None, cert_file: Path | None = None,
                   key_file: Path | None = None, server_name: str | None = None) -> ClientTls:
        if (cert_file is None) != (key_file is None):
            raise SecurityConfigError("--tls-cert and --tls-key go together (got only "
                                      f"{'--tls-cert' if cert_file else '--tls-key'})")
        return cls(_read_pem(ca_file, "--tls-ca", "CERTIFICATE") if ca_file else None,
                   _read_pem(cert_file, "--tls-cert", "CERTIFICATE") if cert_file else None,
                   _read_pem(key_file, "--tls-key", "PRIVATE KEY") if key_file else None,
                   server_name)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.private_key, self.cert_chain)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read_pem(path: Path, flag: str, kind: str) -> bytes:
    data = _read_secret_file(path, flag)
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise SecurityConfigError(f"{flag} {path}: expected a PEM file with a {kind} block "
                                  "(-----BEGIN …-----); got something else")
    return data


def _read_secret_file(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc}); "
                                  "check the path and that this user may read it") from exc


# --- bearer tokens --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSet:
    """Accepted tokens as (name, sha256 of the token). Only digests are kept: comparing
    fixed-length digests hides the tokens' lengths, and the tokens are never in a repr."""

    digests: tuple[tuple[str, bytes], ...] = field(repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.digests)

    @classmethod
    def from_text(cls, text: str, source: str) -> TokenSet:
        """One token per line, ``token`` or ``name:token``; blank lines and ``#`` comments
        are skipped. ``source`` names the file or variable in errors (never a token)."""
        digests: list[tuple[str, bytes]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, token = line.partition(":")
            name, token = (name.strip(), token.strip()) if sep else (f"token-{number}", name)
            _check_token(token, f"{source}:{number}")
            if name in dict(digests):
                raise SecurityConfigError(f"{source}:{number}: token name {name!r} is used "
                                          "twice; give each token its own name")
            digests.append((name, _digest(token)))
        if not digests:
            raise SecurityConfigError(f"{source}: no token (expected one per line, 'token' or "
                                      f"'name:token'); {TOKEN_HINT}")
        return cls(tuple(digests))

    @classmethod
    def from_file(cls, path: Path) -> TokenSet:
        data = _read_secret_file(path, "--auth-tokens-file")
        try:
            return cls.from_text(data.decode("utf-8"), str(path))
        except UnicodeDecodeError as exc:
            raise SecurityConfigError(f"--auth-tokens-file {path}: not UTF-8 text") from exc

    @classmethod
    def from_env(cls, variable: str, environ: Mapping[str, str] = os.environ) -> TokenSet:
        if not environ.get(variable, "").strip():
            raise SecurityConfigError(f"--auth-tokens-env {variable}: the variable is unset or "
                                      "empty; set it to the tokens, one per line")
        return cls.from_text(environ[variable], f"${variable}")

    def identify(self, token: str) -> str | None:
        """The name of the matching token, or None. Every configured token is compared,
        whatever matched, with hmac.compare_digest: the time taken does not depend on which
        token, or how much of one, matched."""
        presented = _digest(token)
        found = None
        for name, expected in self.digests:
            if hmac.compare_digest(presented, expected):
                found = name
        return found


def _check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise SecurityConfigError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} "
                                  f"characters (got {len(token)}); {TOKEN_HINT}")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise SecurityConfigError(f"{where}: a token must be printable without spaces")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def read_token(path: Path | None = None, variable: str | None = None) -> str | None:
    """A client's token: the whole file (stripped) or the variable; None when neither."""
    if path is not None:
        token = _read_secret_file(path, "--token-file").decode("utf-8", "replace").strip()
        source = f"--token-file {path}"
    elif variable is not None:
        token, source = os.environ.get(variable, "").strip(), f"--token-env {variable}"
    else:
        return None
    if not token:
        raise SecurityConfigError(f"{source}: empty; expected the bearer token")
    return token


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry; None when there is none.
    The scheme is case-insensitive (RFC 6750); anything else is returned as "" (invalid)."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


# --- the interceptors ---------------------------------------------------------------------


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid bearer token before it reaches any servicer; counts
    refusals in ``two_tower_auth_failures_total{reason}`` (missing | invalid)."""

    def __init__(self, tokens: TokenSet, metrics: ServiceMetrics) -> None:
        self.tokens, self.metrics = tokens, metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token and self.tokens.identify(token) is not None:
            return handler
        reason = "missing" if token is None else "invalid"
        self.metrics.auth_failures.labels(reason).inc()
        log.debug("refused %s: %s token", method, reason)  # never the token itself
        return _refusal(handler, MISSING_TOKEN if token is None else INVALID_TOKEN,
                        lambda: self.metrics.count_request(method.rsplit("/", 1)[-1],
                                                           "UNAUTHENTICATED"))


def _refusal(handler: grpc.RpcMethodHandler, details: str,
             count: Callable[[], None]) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without
    reading the request: its deserializer ignores the body, so a body that does not parse
    is refused for its credentials like any other, and an unauthenticated caller learns
    nothing about the API (no field named, no parse cost). It replaces the service's
    handler, error boundary included (retrieval.servicer), so it counts the call by code
    itself."""

    async def refuse(request_or_iterator, context):
        count()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    make = next(make for kind, make in kinds if getattr(handler, kind) is not None)
    return make(refuse, request_deserializer=_unread,
                response_serializer=handler.response_serializer)


def _unread(raw: bytes) -> None:
    return None
