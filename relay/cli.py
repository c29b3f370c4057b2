"""``relay`` command line: serve, check-config, send-sample, recall, tail, history, replay, export, spool,
correlation purge, matrix-registration."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import structlog
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay import log as relay_log
from relay import probe
from relay.app import (
    API,
    KEYRING,
    LIFECYCLE,
    METRICS,
    api_runner,
    create_app,
    local_app,
    make_runner,
    reload_credentials,
)
from relay.drainer import Drainer
from relay.errors import ConfigError, SpoolError
from relay.history import Selection, parse_filter, parse_when
from relay.history.commands import Source, Target
from relay.history.commands import export as export_command
from relay.history.commands import history as history_command
from relay.history.commands import replay as replay_command
from relay.matrix import registration as matrix_registration
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from relay.settings import Settings
from relay.spool import Spool, SpoolStore
from relay.store.redis import RedisStore
from relay.store.topology import StoreMisconfigured, Topology
from relay.tail import DEFAULT_KEY, tail
from relay.tencent.samples import KINDS, callback_query, encode, sample_body
from relay.workers import EXIT_CANNOT_LISTEN, socket_path, supervise, worker_slot

log = structlog.get_logger()


def _settings(env: Mapping[str, str], *, require_apps: bool = True) -> Settings | None:
    try:
        return Settings.from_env(env, require_apps=require_apps)
    except ConfigError as exc:
        print("configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(env)
    if settings is None:
        return 1
    print("configuration OK (secrets shown as ***):")
    width = max(len(name) for name in settings.shown())
    for name, value in settings.shown().items():
        print(f"  {name:<{width}}  {_display(value)}")
    for warning in settings.warnings.values():
        print(f"warning: {warning}")
    if not args.probe:
        return 0
    print("probing (each endpoint within 5 s):")
    results = asyncio.run(probe.probe(settings))
    for result in results:
        print(f"  {result.line()}")
    if probe.failed(results):
        print("check-config: a required endpoint did not answer", file=sys.stderr)
        return 2
    return 0


def _display(value: object) -> str:
    if isinstance(value, frozenset | set):
        return ", ".join(sorted(map(str, value))) or "-"
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(env)
    if settings is None:
        return 1
    relay_log.configure(settings.log_level, settings.log_format)
    count = args.workers or settings.workers
    slot = worker_slot(dict(env))
    if slot is None and count > 1:
        if (settings.enrichment or settings.gateway) and not settings.redis_url:
            # A recall callback may reach another worker than its send record or gateway request.
            log.warning(
                "relay.workers_without_shared_store",
                detail="each worker has its own embedded correlation store; set RELAY_REDIS_URL",
            )
        return supervise(count, ["serve"])
    if slot is not None:
        # One spool per worker: the spool lock allows a single process per directory.
        settings = dataclasses.replace(settings, spool_dir=settings.spool_dir / f"worker-{slot[0]}")
        structlog.contextvars.bind_contextvars(worker=slot[0])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings, slot))


async def _listen(site: web.TCPSite, setting: str, host: str, port: int) -> bool:
    """Start listening; on failure (a port in use, an address not on this host) say which setting
    and port, in one line, and return False."""
    try:
        await site.start()
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        log.error("relay.listen_failed", setting=setting, host=host, port=port, error=why)
        print(f"relay: cannot listen on {host}:{port} ({setting}): {why}", file=sys.stderr)
        return False
    return True


async def serve(settings: Settings, worker: tuple[int, int] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down in the order Kubernetes needs.

    1. readiness turns 503 at once, intake continues for ``RELAY_SHUTDOWN_DELAY`` seconds while
       endpoints propagate (a closed port now would refuse callbacks still routed to us);
    2. the listener closes, in-flight requests finish;
    3. cleanup contexts run in reverse: publisher closes its connection.
    """
    app = create_app(settings, worker=worker)
    runner = make_runner(app)
    try:
        await runner.setup()
    except StoreMisconfigured as exc:
        # The Redis servers answered and contradict the settings: no restart will fix that.
        log.error("relay.store_misconfigured", error=str(exc))
        print(f"relay: {exc}", file=sys.stderr)
        await runner.cleanup()
        return EXIT_CANNOT_LISTEN
    # SO_REUSEPORT under --workers: every worker binds the port, the kernel spreads connections.
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024, reuse_port=worker is not None)
    if not await _listen(site, "RELAY_PORT", settings.host, settings.port):
        await runner.cleanup()
        return EXIT_CANNOT_LISTEN
    local: tuple[web.AppRunner, Path] | None = None
    if worker is not None:
        path = socket_path(settings.port, worker[0])
        path.unlink(missing_ok=True)
        local = (web.AppRunner(local_app(app), access_log=None, handle_signals=False), path)
        await local[0].setup()
        await web.UnixSite(local[0], str(path)).start()
    api: web.AppRunner | None = None
    if API in app:
        # The recall API: its own listener, so the callback port can face the internet alone.
        api = api_runner(app)
        await api.setup()
        api_site = web.TCPSite(api, settings.api_host, settings.api_port, reuse_port=worker is not None)
        if not await _listen(api_site, "RELAY_API_PORT", settings.api_host, settings.api_port):
            await api.cleanup()
            await runner.cleanup()
            if local is not None:
                await local[0].cleanup()
            return EXIT_CANNOT_LISTEN
        log.info("relay.api_started", host=settings.api_host, port=settings.api_port, keys=app[KEYRING].names)
    for code, warning in settings.warnings.items():
        log.warning(f"relay.{code}", detail=warning)
    log.info("relay.started", host=settings.host, port=settings.port, exchange=settings.exchange)
    # Everything built so far lives as long as the process: keep it out of every later garbage
    # collection, whose full passes over it otherwise cost tens of ms (the latency tail).
    gc.collect()
    gc.freeze()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_credentials, app)
    await stop.wait()

    app[LIFECYCLE].draining = True
    log.info("relay.draining", delay=settings.shutdown_delay)
    await asyncio.sleep(settings.shutdown_delay)
    if api is not None:
        # First, while the publisher, spool and store are still up: recalls being carried out
        # finish (their callbacks still arrive on the open callback port), then the API closes.
        await api.cleanup()
    await runner.cleanup()
    if local is not None:
        await local[0].cleanup()
        local[1].unlink(missing_ok=True)  # the peers' socket: left behind, it would pile up in /tmp
    metrics = app[METRICS]
    accepted = sum(
        s.value
        for m in metrics.callbacks.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("outcome") == "accepted"
    )
    log.info("relay.stopped", callbacks_accepted=int(accepted))
    return 0


def cmd_send_sample(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    # Only defaults are taken from the environment here; flags may supply everything.
    try:
        settings: Settings | None = Settings.from_env(env, require_apps=False)
    except ConfigError:
        settings = None
    app_id = args.sdkappid or (sorted(settings.accepted_apps)[0] if settings and settings.accepted_apps else None)
    if app_id is None:
        print(
            "send-sample: no SdkAppid: pass --sdkappid (and --token for a signed app), set RELAY_SDKAPPIDS /"
            " RELAY_CALLBACK_TOKENS as the relay has them, or, for the `make run` demo, run `make sample`",
            file=sys.stderr,
        )
        return 1
    token = args.token
    if token is None and settings is not None:
        tokens = settings.callback_tokens.get(app_id, ())
        token = tokens[0] if tokens else None
    port = settings.port if settings else 8080
    url = args.url or f"http://127.0.0.1:{port}/tencent-im/callback"
    body = sample_body(args.kind, items=args.items)
    command = KINDS[args.kind]
    full_url = f"{url}?{callback_query(command, app_id, token)}"
    status, reply = asyncio.run(_post(full_url, encode(body)))
    print(f"POST {url} ({command}, SdkAppid={app_id}, {'signed' if token else 'unsigned'})")
    print(f"-> {status} {reply}")
    return 0 if status == 200 else 1


def cmd_spool(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(env, require_apps=False)
    if settings is None:
        return 1
    directory = Path(args.dir) if args.dir else settings.spool_dir
    if args.action == "drain":
        relay_log.configure(settings.log_level, settings.log_format)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(drain_spool(settings, directory, args.timeout))
    store = SpoolStore(directory, settings.spool_max_bytes)
    try:
        store.open(readonly=True)
    except (SpoolError, sqlite3.Error) as exc:
        print(f"spool {args.action}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "stats":
            stats = store.stats()
            print(
                orjson.dumps(
                    {
                        "path": str(store.path),
                        "events": stats.events,
                        "bytes": stats.bytes,
                        "oldest_spooled_at": stats.oldest_spooled_at,
                        "oldest_age_seconds": round(stats.oldest_age(time.time()), 3),
                    }
                ).decode()
            )
        else:
            out = sys.stdout.buffer
            for item in store.iterate():
                e = item.envelope
                out.write(
                    orjson.dumps(
                        {
                            "seq": item.seq,
                            "spooledAt": item.spooled_at,
                            "eventID": e.event_id,
                            "routingKey": e.routing_key,
                            "headers": e.headers(),
                            "timestamp": e.timestamp,
                            "event": orjson.loads(e.body),
                        }
                    )
                    + b"\n"
                )
            out.flush()
    finally:
        store.close()
    return 0


async def drain_spool(settings: Settings, directory: Path, give_up_after: float) -> int:
    """Forward everything in *directory* now, then exit: 0 when the spool is empty, 1 otherwise."""
    metrics = Metrics(CollectorRegistry())
    spool = Spool(directory, settings.spool_max_bytes)
    await spool.open()
    if not spool.available:
        print(f"spool drain: {spool.last_error}", file=sys.stderr)
        await spool.close()
        return 1
    publisher = AmqpPublisher.from_settings(settings, metrics, connection_name="revoke-relay spool drain")
    await publisher.start()
    drainer = Drainer(spool, publisher, metrics)
    before = spool.events
    try:
        async with asyncio.timeout(give_up_after):
            await publisher.connected.wait()
            await drainer.start()
            while spool.events:  # noqa: ASYNC110 - the count changes on the spool's writer thread
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    finally:
        await drainer.stop(0)
        left = spool.events
        await spool.close()
        await publisher.close()
    print(f"spool drain: forwarded {before - left} events, {left} left in {directory}")
    return 0 if left == 0 else 1


def cmd_tail(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(env, require_apps=False)
    if settings is None:
        return 1
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            tail(settings, sys.stdout, key=args.key, as_json=args.json, count=args.count, give_up_after=args.timeout)
        )


def _history_args(args: argparse.Namespace, env: Mapping[str, str], command: str) -> tuple[Source, Selection] | None:
    """The stream and the selection of ``relay history|replay|export``, or None after printing why not."""
    settings = _settings(env, require_apps=False)
    if settings is None:
        return None
    # aiormq logs each refused connection attempt; the command prints one line saying why instead.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    stream = args.stream or settings.audit_stream
    if stream is None:
        print(f"relay {command}: RELAY_AUDIT_STREAM is not set (or name the stream with --stream)", file=sys.stderr)
        return None
    now = datetime.now(UTC)
    try:
        since = parse_when(args.since, now)
        until = parse_when(args.until, now, allow_first=False) if args.until else None
        filters = tuple(parse_filter(f) for f in args.filter)
    except ValueError as exc:
        print(f"relay {command}: {exc}", file=sys.stderr)
        return None
    unique = bool(getattr(args, "unique", False))
    return Source(settings, stream), Selection(since=since, until=until, filters=filters, unique=unique)


def cmd_history(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    parsed = _history_args(args, env, "history")
    if parsed is None:
        return 2
    return asyncio.run(history_command(*parsed, sys.stdout, sys.stderr, as_json=args.json))


def cmd_replay(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    parsed = _history_args(args, env, "replay")
    if parsed is None:
        return 2
    if args.rate is not None and args.rate <= 0:
        print("relay replay: --rate must be above 0", file=sys.stderr)
        return 2
    target = Target(queue=args.to_queue, routing_key=args.routing_key)
    return asyncio.run(replay_command(*parsed, target, sys.stdout, sys.stderr, dry_run=args.dry_run, rate=args.rate))


def cmd_export(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    parsed = _history_args(args, env, "export")
    if parsed is None:
        return 2
    if args.output is None:
        return asyncio.run(export_command(*parsed, sys.stdout, sys.stderr, fmt=args.format))
    with open(args.output, "w", encoding="utf-8", newline="") as out:
        return asyncio.run(export_command(*parsed, out, sys.stderr, fmt=args.format))


def cmd_correlation(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Privacy tooling for the shared (Redis) correlation store."""
    settings = _settings(env, require_apps=False)
    if settings is None:
        return 1
    if not settings.redis_url:
        print(
            "correlation purge: RELAY_REDIS_URL is not set; the embedded store lives in the relay's memory "
            "and is emptied by restarting the relay",
            file=sys.stderr,
        )
        return 1
    options = settings.redis_options
    assert options is not None

    async def purge() -> int:
        metrics = Metrics(CollectorRegistry())
        store = RedisStore(Topology(options, metrics), settings.correlation_ttl, metrics)
        try:
            return await store.purge_sender(args.user)
        finally:
            await store.close()

    deleted = asyncio.run(purge())
    print(f"correlation purge: deleted {deleted} send records of sender {args.user!r}")
    return 0


def cmd_recall(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Ask the local recall gateway to recall messages (POST /v1/recalls)."""
    settings: Settings | None = None
    problems: list[str] = []
    try:
        settings = Settings.from_env(env, require_apps=False)
    except ConfigError as exc:
        problems = exc.problems
    token = args.token or env.get("RELAY_API_TOKEN")
    if token is None and settings is not None and settings.api_tokens:
        token = next(iter(settings.api_tokens.values()))[0]
    app = args.app or (sorted(settings.tencent_secret_keys)[0] if settings and settings.tencent_secret_keys else None)
    if token is None or app is None:
        if problems:
            # The flags' defaults come from the settings: say why they could not be read.
            print("recall: the relay's settings are invalid, so --token and --app have no defaults:", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            hint = "recall: pass --token and --app (or set RELAY_API_TOKENS and RELAY_TENCENT_SECRET_KEYS)"
            print(hint, file=sys.stderr)
        return 1
    if args.group:
        conversation: dict[str, object] = {"type": "group", "groupID": args.group}
        if args.topic:
            conversation["topicID"] = args.topic
        messages: list[dict[str, object]] = [{"msgSeq": seq} for seq in args.seq]
    elif args.c2c:
        conversation = {"type": "c2c", "sender": args.c2c[0], "receiver": args.c2c[1]}
        messages = [{"msgKey": key} for key in args.key]
    else:
        conversation = {"type": "official_account", "officialAccount": args.official_account}
        messages = [{"msgKey": key} for key in args.key]
    messages += [{"msgID": msg_id} for msg_id in args.msg_id]
    if not messages:
        print("recall: name at least one message (--seq, --key or --msg-id)", file=sys.stderr)
        return 1
    if not args.moderator and not args.moderator_token:
        print("recall: name the moderator (--moderator and/or --moderator-token)", file=sys.stderr)
        return 1
    request: dict[str, object] = {
        "sdkAppID": app,
        "conversation": conversation,
        "messages": messages,
        "reason": args.reason,
        "moderator": {
            **({"userID": args.moderator} if args.moderator else {}),
            **({"token": args.moderator_token} if args.moderator_token else {}),
        },
    }
    if args.request_id:
        request["requestID"] = args.request_id
    port = settings.api_port if settings else 8081
    host = settings.api_host if settings and settings.api_host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    url = args.url or f"http://{host}:{port}/v1/recalls"
    status, reply, headers = asyncio.run(_post_full(url, orjson.dumps(request), {"Authorization": f"Bearer {token}"}))
    replayed = " (replayed: the stored answer to this requestID; Tencent was not called again)"
    print(f"POST {url} -> {status}{replayed if headers.get('Idempotent-Replayed') == 'true' else ''}")
    try:
        print(orjson.dumps(orjson.loads(reply), option=orjson.OPT_INDENT_2).decode())
    except orjson.JSONDecodeError:
        print(reply)
    return 0 if status == 200 else 1


def cmd_matrix_registration(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Print the application-service registration for the homeserver (docs/matrix.md)."""
    settings = _settings(env, require_apps=False)
    if settings is None:
        return 1
    missing = [
        name
        for name, value in (
            ("RELAY_MATRIX_HS_TOKEN", settings.matrix_hs_token),
            ("RELAY_MATRIX_AS_TOKEN", settings.matrix_as_token),
        )
        if not value
    ]
    if missing or settings.matrix_hs_token is None or settings.matrix_as_token is None:
        print(
            f"matrix-registration: set {' and '.join(missing)} (two different secrets, for example from"
            " `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            file=sys.stderr,
        )
        return 1
    try:
        text = matrix_registration.registration_yaml(
            args.url,
            settings.matrix_hs_token,
            settings.matrix_as_token,
            service_id=args.id,
            sender_localpart=args.sender_localpart,
            rooms=args.rooms,
        )
    except ValueError as exc:
        print(f"matrix-registration: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


async def _post(url: str, body: bytes, headers: Mapping[str, str] | None = None) -> tuple[int, str]:
    status, text, _ = await _post_full(url, body, headers)
    return status, text


async def _post_full(
    url: str, body: bytes, headers: Mapping[str, str] | None = None
) -> tuple[int, str, Mapping[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": "application/json", **(headers or {})}) as response,
    ):
        return response.status, await response.text(), dict(response.headers)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description="Tencent IM recall callbacks to RabbitMQ.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_ = sub.add_parser("serve", help="run the relay")
    serve_.add_argument("--workers", type=int, help="processes sharing the port (default: RELAY_WORKERS or 1)")
    serve_.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate the RELAY_* environment")
    check.add_argument(
        "--probe", action="store_true", help="also connect to the broker, Redis and Tencent; exit 2 if one fails"
    )
    check.set_defaults(func=cmd_check_config)
    sample = sub.add_parser("send-sample", help="post a signed sample recall callback to a running relay")
    sample.add_argument("--kind", choices=sorted(KINDS), default="c2c")
    sample.add_argument("--items", type=int, default=1, help="messages per group/official-account callback")
    sample.add_argument("--url", help="callback URL (default: http://127.0.0.1:$RELAY_PORT/tencent-im/callback)")
    sample.add_argument("--sdkappid", help="SdkAppid (default: the first accepted app)")
    sample.add_argument("--token", help="callback token (default: the app's first token, if any)")
    sample.set_defaults(func=cmd_send_sample)
    spool = sub.add_parser("spool", help="inspect or forward the local spool (RELAY_SPOOL_DIR)")
    spool.add_argument(
        "action",
        choices=["stats", "export", "drain"],
        help="stats: count, bytes, oldest age (JSON); export: JSON lines; drain: forward now and exit",
    )
    spool.add_argument("--dir", help="spool directory (default: RELAY_SPOOL_DIR)")
    spool.add_argument("--timeout", type=float, default=300.0, help="drain: give up after this many seconds")
    spool.set_defaults(func=cmd_spool)
    correlation = sub.add_parser("correlation", help="privacy tooling for the Redis correlation store")
    correlation.add_argument("action", choices=["purge"], help="purge: delete every send record of one sender")
    correlation.add_argument("--user", required=True, help="the sender's UserID")
    correlation.set_defaults(func=cmd_correlation)
    recall = sub.add_parser("recall", help="ask the recall gateway (RELAY_API_PORT) to recall messages")
    where = recall.add_mutually_exclusive_group(required=True)
    where.add_argument("--group", metavar="GROUP_ID", help="a group conversation (messages: --seq)")
    where.add_argument("--c2c", nargs=2, metavar=("SENDER", "RECEIVER"), help="a one-to-one conversation (--key)")
    where.add_argument("--official-account", metavar="ACCOUNT", help="an official account (--key)")
    recall.add_argument("--topic", help="the topic of a community group")
    recall.add_argument("--seq", type=int, action="append", default=[], help="a group message's MsgSeq (repeatable)")
    recall.add_argument("--key", action="append", default=[], help="a MsgKey (repeatable)")
    recall.add_argument("--msg-id", action="append", default=[], help="a client msgID from a send record (repeatable)")
    recall.add_argument("--reason", required=True, help="why (the full text goes into the events)")
    recall.add_argument("--moderator", help="the moderator's UserID (asserted by the API key)")
    recall.add_argument(
        "--moderator-token", help="the moderator's ID token (a JWT), verified by the relay (RELAY_API_JWKS_*)"
    )
    recall.add_argument("--request-id", help="idempotency key: the same ID again returns the first answer")
    recall.add_argument("--app", help="SDKAppID (default: the first app in RELAY_TENCENT_SECRET_KEYS)")
    recall.add_argument("--token", help="API token (default: RELAY_API_TOKEN, else the first of RELAY_API_TOKENS)")
    recall.add_argument("--url", help="default: http://127.0.0.1:$RELAY_API_PORT/v1/recalls")
    recall.set_defaults(func=cmd_recall)
    tail_ = sub.add_parser("tail", help="print events from the exchange live (a private, auto-deleted queue)")
    tail_.add_argument("--key", default=DEFAULT_KEY, help=f"binding key pattern (default: {DEFAULT_KEY})")
    tail_.add_argument("--json", action="store_true", help="JSON lines: routingKey, messageID and the event")
    tail_.add_argument("--count", type=int, help="exit 0 after this many events")
    tail_.add_argument("--timeout", type=float, help="exit after this many seconds (1 if --count was not reached)")
    tail_.set_defaults(func=cmd_tail)
    _history_parsers(sub)
    registration = sub.add_parser(
        "matrix-registration", help="print the Matrix application-service registration YAML for the homeserver"
    )
    registration.add_argument("--url", required=True, help="the relay's base URL as the homeserver reaches it")
    registration.add_argument("--id", default=matrix_registration.DEFAULT_ID, help="the application service's ID")
    registration.add_argument(
        "--sender-localpart", default=matrix_registration.DEFAULT_SENDER_LOCALPART, help="localpart of its bot user"
    )
    registration.add_argument(
        "--rooms", default=matrix_registration.DEFAULT_ROOMS, help="regex of the room IDs to watch (default: all)"
    )
    registration.set_defaults(func=cmd_matrix_registration)
    args = parser.parse_args(argv)
    result: int = args.func(args, os.environ if env is None else env)
    return result


def _history_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``relay history``, ``replay`` and ``export`` (docs/history.md)."""

    def window(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--since", required=True, help="first, an ISO-8601 time with an offset, or 30m/2h/7d ago")
        parser.add_argument("--until", help="an ISO-8601 time with an offset or a duration ago (exclusive)")
        parser.add_argument(
            "--filter", action="append", default=[], metavar="FIELD=VALUE", help="a dotted path (repeatable: all match)"
        )
        parser.add_argument("--stream", help="the stream (default: RELAY_AUDIT_STREAM)")

    history_ = sub.add_parser("history", help="print the events of the history stream in a time window")
    window(history_)
    history_.add_argument("--unique", action="store_true", help="keep the first copy of each eventID")
    history_.add_argument("--json", action="store_true", help="JSON lines, as relay tail --json")
    history_.set_defaults(func=cmd_history)
    replay_ = sub.add_parser("replay", help="publish events of the history again, to one queue or routing key")
    window(replay_)
    to = replay_.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-queue", help="an existing queue (through the default exchange): only it sees the replay")
    to.add_argument("--routing-key", help="a routing key on RELAY_EXCHANGE outside the stream's binding message.#")
    replay_.add_argument("--dry-run", action="store_true", help="count what would be published, publish nothing")
    replay_.add_argument("--rate", type=float, help="events per second (default: as fast as confirms allow)")
    replay_.set_defaults(func=cmd_replay)
    export_ = sub.add_parser("export", help="write events of the history as JSON lines or CSV")
    window(export_)
    export_.add_argument("--format", choices=["jsonl", "csv"], required=True)
    export_.add_argument("--output", help="a file (default: standard output)")
    export_.set_defaults(func=cmd_export)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
