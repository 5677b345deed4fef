"""Lists of ids as query parameters, one text each, split by PostgreSQL.

asyncpg checks every element of an array parameter against collections.abc before encoding
it (two isinstance calls through ABCMeta per text element): about 0.4 µs per id, 0.5 ms for
the owner check and batch-id claim of a flush of 256 requests, on the event loop that takes
the requests. Joined into one text, the same ids cost a C join and PostgreSQL's
string_to_array.

The separator is a control character, which no id holds: trip, driver, batch and device ids
are schema.Ident, the org claim is checked as one (auth.py), fence ids are the service's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

SEP = "\x1f"  # the unit separator


def split(param: str) -> str:
    """SQL for the text[] that ``param`` (a placeholder such as $1, given ids()) holds."""
    return f"string_to_array({param}, E'\\x1f')"


def ids(values: Sequence[str]) -> str:
    """``values`` as one parameter for split(). An empty id, or one that holds the separator,
    would shift every id after it onto another row's: it raises asyncpg's DataError, as an
    array element PostgreSQL cannot take does, so that a flush finds the request it came
    from and refuses that one alone (flush.py), never a whole flush."""
    joined = SEP.join(values)
    if values and (joined.count(SEP) != len(values) - 1 or "" in values):
        raise asyncpg.DataError("an id is empty or holds a control character")
    return joined


def columns(rows: Sequence[Sequence[str]], width: int) -> tuple[str, ...]:
    """Each of the ``width`` columns of ``rows`` (tuples of ids) as one parameter: ids()."""
    return tuple(ids([row[i] for row in rows]) for i in range(width))


def numbers(values: Sequence[int]) -> str:
    """Integers as one parameter for split(...)::int8[] (an int costs asyncpg one ABCMeta check)."""
    return SEP.join(map(str, values))
