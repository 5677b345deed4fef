"""Command line: serve, migrate, partitions, token."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP service (uvloop)")
    sub.add_parser("migrate", help="apply pending SQL migrations from sql/, once each")
    p = sub.add_parser("partitions", help="list partitions; --maintain also creates and drops")
    p.add_argument("--maintain", action="store_true", help="create ahead, drop past retention")
    t = sub.add_parser("token", help="print a JWT signed with the configured key")
    t.add_argument("--role", choices=["driver", "dispatcher"], required=True)
    t.add_argument("--sub", required=True)
    t.add_argument("--org", required=True)
    t.add_argument("--ttl", type=int, default=86_400, help="seconds until it expires")
    t.add_argument("--private-key", help="PEM file to sign RS256/ES256 tokens with")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2

    from . import cli

    if args.command == "serve":
        return cli.serve(settings)
    if args.command == "migrate":
        return asyncio.run(cli.migrate(settings))
    if args.command == "partitions":
        return asyncio.run(cli.partitions(settings, args.maintain))
    return cli.token(settings, args)


if __name__ == "__main__":
    sys.exit(main())
