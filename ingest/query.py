"""Query parameters of the read endpoints: times, limits, numbers; BadQuery names the one at
fault (the handlers' 400 invalid_query)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from .validate import parse_rfc3339, rfc3339_problem

# Open ends of a range, inside PostgreSQL's timestamptz range.
MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(9999, 1, 1, tzinfo=UTC)
INTEGER = re.compile(r"-?[0-9]+")  # ASCII only: int() also takes "+1", " 1", "1_0", other digits


class BadQuery(ValueError):
    pass


def parse_time(value: str, name: str) -> datetime:
    """RFC 3339 with an offset, or epoch milliseconds: in UTC, cut to the millisecond as
    stored pings are (validate.parse_rfc3339). Beyond the years 1-9999 in UTC: BadQuery."""
    if INTEGER.fullmatch(value):
        digits = value.lstrip("-").lstrip("0")
        try:
            if len(digits) > 20:  # out of range anyway; and int() refuses 4300 digits
                raise OverflowError(value)
            ms = int(digits or "0")
            return MIN_TIME + timedelta(milliseconds=-ms if value[0] == "-" else ms)
        except OverflowError:
            raise BadQuery(f"{name}: epoch milliseconds out of range") from None
    try:
        ts = parse_rfc3339(value)
        return ts if ts.tzinfo is UTC else ts.astimezone(UTC)  # asyncpg would, unguarded
    except ValueError:
        raise BadQuery(f"{name}: {rfc3339_problem(value)}") from None
    except OverflowError:
        raise BadQuery(f"{name}: out of range (the years 1 to 9999, in UTC)") from None


def parse_limit(query: Mapping[str, str], default: int, most: int) -> int:
    """``limit``: an integer from 1 to ``most``; ``default`` when absent."""
    raw = query.get("limit") or str(default)
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not 1 <= int(raw) <= most:
        raise BadQuery(f"limit: must be an integer between 1 and {most}")
    return int(raw)


def parse_number(query: Mapping[str, str], name: str, low: float, high: float) -> float:
    """A required finite number within [low, high]."""
    raw = query.get(name)
    if not raw:
        raise BadQuery(f"{name}: required")
    try:
        value = float(raw)
    except ValueError:
        raise BadQuery(f"{name}: not a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise BadQuery(f"{name}: must be a finite number between {low:g} and {high:g}")
    return value
