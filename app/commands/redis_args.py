"""Redis credential flags shared by the commands that talk to Redis."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_redis_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-username", metavar="NAME", help="Redis ACL user (default: default)")
    p.add_argument("--redis-password-file", type=Path, metavar="FILE",
                   help="file holding the Redis password (kept off the command line)")
    p.add_argument("--redis-password-env", metavar="VAR",
                   help="environment variable holding the Redis password")
    p.add_argument("--redis-tls-ca", type=Path, metavar="FILE",
                   help="rediss:// only: PEM CA of the Redis server's certificate")
    p.add_argument("--redis-tls-cert", type=Path, metavar="FILE",
                   help="rediss:// only: client certificate, when Redis asks for one")
    p.add_argument("--redis-tls-key", type=Path, metavar="FILE", help="key of --redis-tls-cert")

def redis_auth(args):
    from retrieval.redis_options import RedisAuth

    return RedisAuth.from_sources(args.redis_username, args.redis_password_file,
                                  args.redis_password_env, args.redis_tls_ca,
                                  args.redis_tls_cert, args.redis_tls_key)
