"""Measurement A's server: the HTTP ceiling. A bare aiohttp app on uvloop, set up like the relay's
(same runner options), whose POST handler reads the body and answers the relay's exact OK reply.

    python -m bench.bare_http --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import web

from relay.tencent.ingress import OK_BODY

CALLBACK_PATH = "/tencent-im/callback"


async def callback(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=OK_BODY, content_type="application/json")


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(host: str, port: int) -> None:
    app = web.Application(client_max_size=65536)
    app.router.add_post(CALLBACK_PATH, callback)
    app.router.add_get("/readyz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=15.0, lingering_time=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
