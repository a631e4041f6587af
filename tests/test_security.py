"""Security of the service as a caller and an operator see it: TLS and mutual TLS on the gRPC
port, bearer tokens, Redis with a password, an ACL user and TLS, secrets kept out of logs.

Real parts throughout: certificates from a throwaway CA made here with `cryptography`, real
`two-tower serve` processes on free loopback ports, real redis-server processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from retrieval.client import build_request, open_channel, retrieve
from contracts.redaction import redact_url
from retrieval.redis_options import RedisAuth, RedisConfigError
from retrieval.security import (
    INVALID_TOKEN, MISSING_TOKEN, ClientTls, SecurityConfigError, TlsConfig, TokenSet,
    bearer_token,
)
from app.processes import free_port as _free_port
from tests.conftest import start_server, stop_server

x509 = pytest.importorskip("cryptography.x509", reason="pip install cryptography==50.0.2")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "deploy" / "grpc_health_check.py"
TOKEN = "retrieval-frontend-0123456789abcdef"
OTHER_TOKEN = "batch-jobs-fedcba9876543210fedcba"
REDIS_ADMIN_PASSWORD = "admin-pw-7d41c0e9b2"
REDIS_SERVICE_PASSWORD = "svc-pw-51f3a8c6e0"
NIGHT = {"hour_of_day": 22, "device": "tv"}
WEDNESDAY = 1_700_611_200


# --- a throwaway PKI ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name, issuer_key, *, ca=False, sans=()):
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                         subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("two-tower test CA", ca_key, None, None, ca=True)
    rogue_ca = _cert("somebody else's CA", rogue_ca_key, None, None, ca=True)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = _write(directory, "server",
                    _cert("retrieval", server_key, ca.subject, ca_key, sans=sans), server_key)
    client = _write(directory, "client",
                    _cert("frontend", client_key, ca.subject, ca_key), client_key)
    rogue = _write(directory, "rogue",
                   _cert("intruder", rogue_key, rogue_ca.subject, rogue_ca_key), rogue_key)
    return Pki(ca_path, *server, *client, *rogue)


# --- servers ------------------------------------------------------------------------------


def _pair_args(pipeline) -> list[str]:
    return ["--model", str(pipeline.model_dir), "--index", str(pipeline.index_dir),
            "--watch-interval", "0"]


@pytest.fixture(scope="module")
def tls_token_server(pipeline, pki, tmp_path_factory):
    """TLS (no client certificate asked) and bearer tokens from a file."""
    workdir = tmp_path_factory.mktemp("tls-token-server")
    tokens = workdir / "tokens"
    tokens.write_text(f"# name:token, one per line\nfrontend:{TOKEN}\n{OTHER_TOKEN}\n")
    running = start_server([*_pair_args(pipeline), "--features", str(pipeline.data_dir),
                            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                            "--auth-tokens-file", str(tokens), "--metrics-port", "0"], workdir)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def mtls_server(pipeline, pki, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mtls-server")
    running = start_server([*_pair_args(pipeline), "--features", str(pipeline.data_dir),
                            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                            "--tls-client-ca", str(pki.ca)], workdir)
    yield running
    stop_server(running)


def _call(address: str, tls: ClientTls | None = None, token: str | None = None, user="u1"):
    async def go():
        async with open_channel(address, tls, token) as channel:
            return await retrieve(channel, build_request(user, 10, NIGHT, WEDNESDAY), 10)
    return asyncio.run(go()).response


def _code(address: str, tls: ClientTls | None = None, token: str | None = None):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _call(address, tls, token)
    return caught.value.code(), caught.value.details()


def _trusting(pki: Pki, **kw) -> ClientTls:
    return ClientTls.from_files(pki.ca, **kw)


# --- TLS ----------------------------------------------------------------------------------


def test_a_tls_client_that_trusts_the_ca_is_served(tls_token_server, pki):
    reply = _call(tls_token_server.address, _trusting(pki), TOKEN)
    assert len(reply.candidates) == 10


def test_the_tls_port_refuses_plaintext_clients(tls_token_server):
    code, _ = _code(tls_token_server.address, None, TOKEN)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_servers_ca_fails(tls_token_server, pki):
    code, _ = _code(tls_token_server.address, ClientTls.from_files(pki.rogue_cert), TOKEN)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_certificate_signed_by_the_ca(mtls_server, pki):
    tls = _trusting(pki, cert_file=pki.client_cert, key_file=pki.client_key)
    assert len(_call(mtls_server.address, tls).candidates) == 10


def test_mutual_tls_refuses_clients_without_a_certificate_or_with_a_foreign_one(mtls_server, pki):
    assert _code(mtls_server.address, _trusting(pki))[0] == grpc.StatusCode.UNAVAILABLE
    rogue = _trusting(pki, cert_file=pki.rogue_cert, key_file=pki.rogue_key)
    assert _code(mtls_server.address, rogue)[0] == grpc.StatusCode.UNAVAILABLE
    assert _code(mtls_server.address, None)[0] == grpc.StatusCode.UNAVAILABLE


def test_the_health_probe_script_speaks_tls_and_mutual_tls(tls_token_server, mtls_server, pki):
    def probe(address, *flags):
        return subprocess.run([sys.executable, str(PROBE), "--address", address, *flags],
                              capture_output=True, text=True, timeout=60)

    assert probe(tls_token_server.address, "--tls-ca", str(pki.ca)).returncode == 0
    assert probe(mtls_server.address, "--tls-ca", str(pki.ca), "--tls-cert",
                 str(pki.client_cert), "--tls-key", str(pki.client_key)).returncode == 0
    refused = probe(mtls_server.address, "--tls-ca", str(pki.ca))
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


def test_the_server_key_must_match_its_certificate(pki):
    with pytest.raises(SecurityConfigError, match="does not match --tls-cert"):
        TlsConfig.from_files(pki.server_cert, pki.client_key)


def test_a_missing_or_non_pem_tls_file_is_named(pki, tmp_path):
    with pytest.raises(SecurityConfigError, match=r"--tls-cert .*nope\.crt: cannot read it"):
        TlsConfig.from_files(tmp_path / "nope.crt", pki.server_key)
    (tmp_path / "garbage.key").write_text("not a key\n")
    with pytest.raises(SecurityConfigError, match=r"--tls-key .*garbage\.key: expected a PEM"):
        TlsConfig.from_files(pki.server_cert, tmp_path / "garbage.key")


def test_the_private_key_is_not_in_the_configs_repr(pki):
    assert b"PRIVATE" not in repr(TlsConfig.from_files(pki.server_cert, pki.server_key)).encode()


# --- bearer tokens ------------------------------------------------------------------------


def test_a_call_without_a_token_is_unauthenticated(tls_token_server, pki):
    assert _code(tls_token_server.address, _trusting(pki)) == (
        grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)


def test_a_wrong_token_is_unauthenticated_and_never_echoed(tls_token_server, pki):
    wrong = "not-the-token-at-all-1234567890"
    code, details = _code(tls_token_server.address, _trusting(pki), wrong)
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
    assert wrong not in tls_token_server.log()


def test_every_token_of_the_file_is_accepted(tls_token_server, pki):
    for token in (TOKEN, OTHER_TOKEN):
        assert len(_call(tls_token_server.address, _trusting(pki), token).candidates) == 10


def test_health_needs_no_token_so_kubernetes_probes_work(tls_token_server, pki):
    tls = _trusting(pki)
    with grpc.secure_channel(tls_token_server.address, tls.channel_credentials()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_token_like_any_other_service(tls_token_server, pki):
    def list_services(metadata=()):
        with grpc.secure_channel(tls_token_server.address,
                                 _trusting(pki).channel_credentials()) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            return [r for r in stub.ServerReflectionInfo(iter([request]), timeout=5,
                                                         metadata=metadata)]

    with pytest.raises(grpc.RpcError) as caught:
        list_services()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [reply] = list_services([("authorization", f"Bearer {TOKEN}")])
    names = {s.name for s in reply.list_services_response.service}
    assert "two_tower.retrieval.v1.RetrievalService" in names


def test_refusals_are_counted_by_reason(tls_token_server, pki):
    _code(tls_token_server.address, _trusting(pki))
    _code(tls_token_server.address, _trusting(pki), "wrong-token-but-long-enough-0000")
    url = f"http://127.0.0.1:{tls_token_server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    counts = {reason: _sample(text, f'two_tower_auth_failures_total{{reason="{reason}"}}')
              for reason in ("missing", "invalid")}
    assert counts["missing"] >= 1 and counts["invalid"] >= 1
    assert _sample(text, 'two_tower_requests_total{code="UNAUTHENTICATED",rpc="Retrieve"}') >= 2


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_two_tower_query_connects_with_tls_and_a_token(tls_token_server, pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    base = [sys.executable, "-m", "app.cli", "query", "--address",
            tls_token_server.address, "--user-id", "u1", "--tls-ca", str(pki.ca)]
    done = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "rank" in done.stdout
    environ = {k: v for k, v in os.environ.items() if k != "TWO_TOWER_TOKEN"}
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60, env=environ)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_every_configured_token_is_compared_even_after_a_match(monkeypatch):
    tokens = TokenSet.from_text(f"a:{TOKEN}\nb:{OTHER_TOKEN}\nc:{'z' * 20}\n", "tokens")
    import retrieval.security as security

    compared = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest",
                        lambda x, y: compared.append(y) or real(x, y))
    assert tokens.identify(TOKEN) == "a"
    assert len(compared) == 3  # no early exit on the first match
    assert tokens.identify("nope-nope-nope-nope") is None


@pytest.mark.parametrize("text, message", [
    ("", "no token"),
    ("short\n", "at least 16 characters"),
    (f"x:{TOKEN}\nx:{OTHER_TOKEN}\n", "name 'x' is used twice"),
    (f"a:{TOKEN} trailing\n", "printable without spaces"),
])
def test_a_bad_tokens_file_is_refused_with_the_line_and_without_the_token(text, message):
    with pytest.raises(SecurityConfigError, match=message) as caught:
        TokenSet.from_text(text, "tokens.txt")
    assert "short" not in str(caught.value) and TOKEN not in str(caught.value)


def test_tokens_from_an_environment_variable():
    tokens = TokenSet.from_env("TT_TOKENS", {"TT_TOKENS": f"frontend:{TOKEN}"})
    assert tokens.names == ("frontend",) and tokens.identify(TOKEN) == "frontend"
    assert TOKEN not in repr(tokens)
    with pytest.raises(SecurityConfigError, match="TT_TOKENS: the variable is unset"):
        TokenSet.from_env("TT_TOKENS", {})


@pytest.mark.parametrize("metadata, token", [
    ((), None), ((("authorization", f"Bearer {TOKEN}"),), TOKEN),
    ((("authorization", f"bearer  {TOKEN} "),), TOKEN), ((("authorization", "Basic abc"),), ""),
])
def test_bearer_token_reads_the_authorization_metadata(metadata, token):
    assert bearer_token(metadata) == token


def test_serve_names_an_unreadable_tokens_file_and_exits_2(pipeline, pki, tmp_path):
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", *_pair_args(pipeline),
                           "--auth-tokens-file", str(tmp_path / "missing-tokens")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"--auth-tokens-file {tmp_path / 'missing-tokens'}: cannot read it" in done.stderr


# --- Redis: password, ACL user, TLS ----------------------------------------------------------


@dataclass(frozen=True)
class SecuredRedis:
    port: int  # plaintext
    tls_port: int


@pytest.fixture(scope="module")
def secured_redis(pki, tmp_path_factory):
    """redis-server with a default-user password, an ACL user `svc` and a TLS port (server
    certificate from the throwaway CA; client certificates not asked for)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    directory = tmp_path_factory.mktemp("secured-redis")
    port, tls_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(directory / "redis.log"),
         "--requirepass", REDIS_ADMIN_PASSWORD,
         "--user", "svc", "on", f">{REDIS_SERVICE_PASSWORD}", "~tt:v1:*", "+@all",
         "--tls-port", str(tls_port), "--tls-cert-file", str(pki.server_cert),
         "--tls-key-file", str(pki.server_key), "--tls-ca-cert-file", str(pki.ca),
         "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port, password=REDIS_ADMIN_PASSWORD, socket_timeout=0.5) as r:
                r.ping()
            break
        except redis.RedisError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"secured redis-server did not start:\n"
                            f"{(directory / 'redis.log').read_text()}")
            time.sleep(0.05)
    yield SecuredRedis(port, tls_port)
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def loaded_secured_redis(secured_redis, pipeline, tmp_path_factory):
    """Features written by `two-tower load-features` as the ACL user, password in a file."""
    password_file = tmp_path_factory.mktemp("redis-secret") / "password"
    password_file.write_text(REDIS_SERVICE_PASSWORD + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "load-features", "--data", str(pipeline.data_dir),
         "--redis-url", f"redis://127.0.0.1:{secured_redis.port}/0", "--redis-username", "svc",
         "--redis-password-file", str(password_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return secured_redis, password_file


def test_the_service_reads_features_from_redis_over_tls_as_an_acl_user(
        loaded_secured_redis, pki, pipeline, server, tmp_path):
    secured, password_file = loaded_secured_redis
    running = start_server([*_pair_args(pipeline),
                            "--redis-url", f"rediss://127.0.0.1:{secured.tls_port}/0",
                            "--redis-tls-ca", str(pki.ca), "--redis-username", "svc",
                            "--redis-password-file", str(password_file),
                            *_patient_redis_args()], tmp_path)
    try:
        from_redis = _call(running.address, user="u1")
    finally:
        stop_server(running)
    in_process = _call(server.address, user="u1")  # same pair, features from the dataset
    assert [c.item_id for c in from_redis.candidates] == [c.item_id for c in in_process.candidates]
    assert REDIS_SERVICE_PASSWORD not in running.log()


def _patient_redis_args() -> list[str]:
    """A TLS handshake takes tens of milliseconds on a busy 2-core test machine: where serve
    bounds each Redis call, give it room (the bound is not what these tests are about)."""
    from app.cli import build_parser as _parser

    [sub] = [a for a in _parser()._actions if a.dest == "command"]
    flags = {o for a in sub.choices["serve"]._actions for o in a.option_strings}
    return ["--redis-timeout-ms", "2000"] if "--redis-timeout-ms" in flags else []


def test_a_wrong_redis_password_stops_serve_at_start_naming_the_problem(
        loaded_secured_redis, pipeline, tmp_path):
    secured, _ = loaded_secured_redis
    wrong = "wrong-password-3b9e1d"
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", *_pair_args(pipeline), "--port", "0",
         "--redis-url", f"redis://127.0.0.1:{secured.port}/0", "--redis-username", "svc",
         "--redis-password-env", "TT_REDIS_PASSWORD"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TT_REDIS_PASSWORD": wrong})
    assert done.returncode == 2
    assert "refused the credentials" in done.stderr and "--redis-password" in done.stderr
    assert wrong not in done.stderr + done.stdout


def test_redis_tls_options_need_a_rediss_url(pki):
    auth = RedisAuth(tls_ca_file=pki.ca)
    with pytest.raises(RedisConfigError, match="need a rediss:// URL"):
        auth.client_kwargs("redis://127.0.0.1:6379/0")
    assert auth.client_kwargs("rediss://127.0.0.1:6380/0") == {"ssl_ca_certs": str(pki.ca)}


def test_index_publish_notifies_a_password_protected_redis_without_the_password_on_the_command_line(
        secured_redis, pipeline, tmp_path):
    url = f"redis://127.0.0.1:{secured_redis.port}/0"
    with redis.Redis.from_url(url, password=REDIS_ADMIN_PASSWORD) as client:
        subscriber = client.pubsub(ignore_subscribe_messages=True)
        subscriber.subscribe("tt:v1:index-published")
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "build-index", "--model",
             str(pipeline.model_dir), "--out", str(tmp_path / "indexes"), "--index", "Flat",
             "--notify-redis", url, "--redis-password-env", "TT_NOTIFY_PASSWORD"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "TT_NOTIFY_PASSWORD": REDIS_ADMIN_PASSWORD})
        assert done.returncode == 0, done.stderr
        deadline, message = time.monotonic() + 5, None
        while message is None and time.monotonic() < deadline:
            message = subscriber.get_message(timeout=0.1)
        subscriber.close()
    assert message is not None, "no index-published message reached the subscriber"
    assert json.loads(message["data"])["index_version"] == Path(done.stdout.split()[-1]).name
    assert REDIS_ADMIN_PASSWORD not in done.stdout + done.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "app.cli", "rollback", "--store", str(tmp_path / "indexes"),
         "--notify-redis", f"redis://:in-url@127.0.0.1:{secured_redis.port}/0",
         "--redis-password-env", "TT_NOTIFY_PASSWORD"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "TT_NOTIFY_PASSWORD": REDIS_ADMIN_PASSWORD})
    assert wrong.returncode == 2 and "already has a password" in wrong.stderr


def test_a_password_in_the_url_and_in_a_file_is_refused_without_showing_either():
    auth = RedisAuth(password="from-the-file-secret")
    with pytest.raises(RedisConfigError) as caught:
        auth.client_kwargs("redis://:in-the-url-secret@10.0.0.1:6379/0")
    assert "secret" not in str(caught.value) and "10.0.0.1" in str(caught.value)
    assert "from-the-file" not in repr(auth)


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://svc:p%40ss@redis.example:6380/1", "rediss://svc:***@redis.example:6380/1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://svc@host/0", "redis://svc@host/0"),
])
def test_redact_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


# --- artifacts: only what the checksums cover, nothing pickled --------------------------------


def _copy_index(pipeline, tmp_path: Path) -> Path:
    copy = tmp_path / pipeline.index_dir.name
    shutil.copytree(pipeline.index_dir, copy)
    return copy


def _rewrite_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_an_object_array_in_an_artifact_is_refused_not_unpickled(pipeline, tmp_path):
    from indexer.artifact import load_index_artifact
    from contracts.model_manifest import checksums
    from contracts.errors import ArtifactError

    index_dir = _copy_index(pipeline, tmp_path)
    ids = np.load(index_dir / "item_ids.npy", allow_pickle=False)
    np.save(index_dir / "item_ids.npy", np.array(list(ids), dtype=object), allow_pickle=True)
    _rewrite_manifest(index_dir, lambda doc: doc.update(files=checksums(index_dir)))
    with pytest.raises(ArtifactError, match=r"item_ids\.npy: cannot be read without pickle"):
        load_index_artifact(index_dir)


def test_a_file_the_loader_reads_must_be_covered_by_the_checksums(pipeline, tmp_path):
    from indexer.artifact import load_index_artifact
    from contracts.errors import ArtifactError

    index_dir = _copy_index(pipeline, tmp_path)
    _rewrite_manifest(index_dir, lambda doc: doc["files"].pop("index.faiss"))
    with pytest.raises(ArtifactError, match=r"index\.faiss: not listed in the manifest"):
        load_index_artifact(index_dir)


def test_a_manifest_cannot_point_outside_its_artifact(pipeline, tmp_path):
    from indexer.artifact import load_index_artifact
    from retrieval.swap import resolve_pair_dirs
    from contracts.errors import ArtifactError

    index_dir = _copy_index(pipeline, tmp_path)
    _rewrite_manifest(index_dir, lambda doc: doc["files"].update({"../../etc/passwd": "0"}))
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        load_index_artifact(index_dir)
    _rewrite_manifest(index_dir, lambda doc: doc.update(model_version="../../elsewhere/m-1"))
    with pytest.raises(ArtifactError, match="model_version must be a version directory name"):
        resolve_pair_dirs(pipeline.model_dir.parent, index_dir)


def test_no_code_path_unpickles():
    sources = [p for d in ("training", "indexer", "retrieval") for p in (ROOT / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
