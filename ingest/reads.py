"""Where a read-only query goes.

Placeholder until DATABASE_READ_URL lands: every read uses the primary's pool.
"""

from __future__ import annotations

import asyncpg
from aiohttp import web

from .typedefs import POOL


def read_pool(app: web.Application) -> asyncpg.Pool:
    """The pool for a read that may lag the latest commit by up to READ_MAX_LAG_S."""
    return app[POOL]
