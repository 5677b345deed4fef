"""JSON responses built from the wire schema's encoder."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .schema import Error, Rejected, encoder


def json_response(
    obj: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=encoder.encode(obj), status=status, content_type="application/json", headers=headers
    )


def error(
    status: int,
    code: str,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    rejected: list[Rejected] | None = None,
) -> web.Response:
    return json_response(Error(error=code, detail=detail, rejected=rejected), status, headers)


def retry_later(code: str, detail: str, retry_after_s: float = 1.0) -> web.Response:
    return error(503, code, detail, headers={"Retry-After": str(max(1, round(retry_after_s)))})
