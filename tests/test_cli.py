"""The command line (ingest/cli.py): a bad setting stops `serve` with one line naming it;
`serve` with AUTH_DISABLED says so loudly and refuses to start without a key otherwise;
`token` signs with the secret or a private key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import aiohttp
import jwt
import pytest
import uvloop

from ingest.auth import Principal, Verifier
from ingest.settings import ENV_NAMES, load_settings

from .conftest import ROOT, SECRET, TEST_LOOP, pem_private, pem_public, run_cli


async def test_tests_run_on_the_loop_serve_runs():
    """`serve` runs uvloop; so do the tests, unless INGEST_TEST_LOOP=asyncio. `make test-debug`
    (PYTHONASYNCIODEBUG=1) runs them in debug mode."""
    loop = asyncio.get_running_loop()
    expected = uvloop.Loop if TEST_LOOP == "uvloop" else asyncio.SelectorEventLoop
    assert type(loop) is expected
    assert loop.get_debug() is bool(os.environ.get("PYTHONASYNCIODEBUG"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    return {**env, **extra}


async def _run(*args: str, env: dict[str, str], timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def _serve_auth_disabled(database: str, redis_prefix: str) -> tuple[int, str, str]:
    # ROLE=ingest: the banner does not depend on the role, and without the pub/sub listener
    # this test does not wait on its occasional hang at shutdown (reported separately).
    env = _env(
        AUTH_DISABLED="true", PORT="0", HOST="127.0.0.1", DATABASE_URL=database,
        REDIS_PREFIX=redis_prefix, ROLE="ingest",
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest", "serve", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            while b'"listening"' not in (line := await proc.stdout.readline()):
                assert line, "exited before listening"
            port = json.loads(line)["port"]
            # Signal handlers are installed just after that line: one request makes sure.
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_auth_is_off_only_when_asked_and_the_service_says_so(
    database, redis_prefix, ec_key, tmp_path
):
    key_file = tmp_path / "issuer.pem"
    key_file.write_text(pem_private(ec_key))
    served, no_key, hs_token, es_token = await asyncio.gather(
        _serve_auth_disabled(database, redis_prefix),
        _run("serve", env=_env(DATABASE_URL=database)),
        _run("token", "--role", "driver", "--sub", "drv_1", "--org", "org_1", env=_env(JWT_SECRET=SECRET)),
        _run("token", "--role", "dispatcher", "--sub", "d_1", "--org", "org_2", "--ttl", "60",
             "--private-key", str(key_file), env=_env(JWT_PUBLIC_KEY=pem_public(ec_key))),
    )  # fmt: skip
    code, _, err = served
    assert code == 0, err
    assert "AUTH_DISABLED=true: every request is accepted without a token" in err
    assert "!" * 80 in err  # a banner, not a log line lost among others

    code, out, err = no_key
    assert code == 2 and out == ""
    assert err.startswith(
        "ingest: invalid setting JWT_SECRET: set JWT_SECRET (HS256) or JWT_PUBLIC_KEY"
    )
    assert "AUTH_DISABLED=true for development" in err

    code, out, err = hs_token
    assert code == 0, err
    principal = Verifier(load_settings({}, jwt_secret=SECRET)).verify(out.strip())
    assert principal == Principal("drv_1", "driver", "org_1")

    code, out, err = es_token
    assert code == 0, err
    tok = out.strip()
    assert jwt.get_unverified_header(tok)["alg"] == "ES256"
    assert 55 <= jwt.decode(tok, options={"verify_signature": False})["exp"] - time.time() <= 60
    principal = Verifier(load_settings({}, jwt_public_key=pem_public(ec_key))).verify(tok)
    assert principal == Principal("d_1", "dispatcher", "org_2")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"FLUSH_INTERVAL_MS": "soon"}, "FLUSH_INTERVAL_MS"),
        ({"PORT": "70000"}, "PORT"),
        ({"ACK_MODE": "eventually"}, "ACK_MODE"),
        ({"ROLE": "everything"}, "ROLE"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"JWT_SECRET": ""}, "JWT_SECRET"),
        ({"BUFFER_MAX_ROWS": "0"}, "BUFFER_MAX_ROWS"),
    ],
)
def test_a_bad_setting_stops_the_process_with_one_line_naming_it(env, name):
    result = run_cli("serve", **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], result.stderr
