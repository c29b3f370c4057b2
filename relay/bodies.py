"""Reading a request body on an aiohttp route: as sent, within a size cap and a deadline.

Shared by every provider's endpoint on the callback port. aiohttp runs there with
``auto_decompress=False`` (relay.app.make_runner), so a body arrives exactly as sent and one in any
coding but identity is refused, never inflated (no decompression bomb, one behaviour with the fast
path). Each provider maps :class:`BodyError` to its own stable codes.
"""

from __future__ import annotations

import asyncio
from enum import Enum

import aiohttp
from aiohttp import hdrs, web

from relay.errors import RelayError


class BodyProblem(str, Enum):
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    TOO_LARGE = "body_too_large"
    TIMEOUT = "body_timeout"
    INCOMPLETE = "incomplete_body"


class BodyError(RelayError):
    """The body cannot be read within the rules; ``detail`` is for the log."""

    def __init__(self, problem: BodyProblem, detail: str) -> None:
        super().__init__(f"{problem.value}: {detail}")
        self.problem = problem
        self.detail = detail


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """At most *limit* bytes within *timeout* seconds; never buffers past the cap."""
    codings = request.headers.getall(hdrs.CONTENT_ENCODING, ())
    if codings and {c.strip(" \t").lower() for v in codings for c in v.split(",")} != {"identity"}:
        raise BodyError(BodyProblem.UNSUPPORTED_ENCODING, f"Content-Encoding {', '.join(codings)[:100]!r}")
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(BodyProblem.TOO_LARGE, f"Content-Length {request.content_length} > {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        if request.content.is_eof() and request.content_length is not None:
            # The whole (small) body arrived with the headers: no waiting, so no deadline needed.
            return await request.content.read()
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyError(BodyProblem.TOO_LARGE, f"body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyError(BodyProblem.TIMEOUT, f"body not received within {timeout}s") from None
    except (ConnectionError, web.RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
        raise BodyError(BodyProblem.INCOMPLETE, repr(exc)[:200]) from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
