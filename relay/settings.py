"""Settings: one frozen object, built once from an environment mapping and validated at start.

Nothing here reads ``os.environ`` by itself; the caller passes the mapping in, so tests build
settings from plain dicts and the service validates its whole environment before it binds a port.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit, urlunsplit

from relay.access import Network, parse_networks
from relay.endpoints import Endpoint, EndpointError, parse_endpoints, redact
from relay.errors import ConfigError
from relay.gateway.keys import ApiKey, check_keys, legacy_keys, load_keys
from relay.gateway.moderators import load_jwks_file
from relay.store.topology import Mode, RedisOptions, split_urls

_LOG_LEVELS = ("debug", "info", "warning", "error")
# AMQP 0-9-1 exchange/queue name domain (what the protocol codec enforces), at most 127 chars.
_AMQP_NAME = re.compile(r"[A-Za-z0-9\-_.:@#,/+]{1,127}")
_ON = frozenset({"on", "true", "1", "yes"})
_OFF = frozenset({"off", "false", "0", "no"})
_NAME_RULE = "has characters outside A-Z a-z 0-9 - _ . : @ # , / + (at most 127)"
_LOG_FORMATS = ("json", "console")
# Matrix tokens go into a YAML registration and an Authorization header: visible ASCII, no spaces.
_MATRIX_TOKEN = re.compile(r"[!-~]{16,512}")
_MATRIX_SHAPE_RULE = "expected 16 to 512 visible ASCII characters without spaces"


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by ``***`` (safe for logs and reprs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated configuration of one relay process; see the README's configuration table."""

    amqp_url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    exchange: str = "im.events"
    queues: tuple[str, ...] = ()
    host: str = "0.0.0.0"  # noqa: S104 - a service in a pod listens on all interfaces
    port: int = 8080
    sdkappids: frozenset[str] = frozenset()
    # SdkAppid -> every token accepted for it (several during a rotation). Never printed.
    callback_tokens: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    signature_max_age: int = 60
    max_body_bytes: int = 65536
    publish_timeout: float = 5.0
    log_level: str = "info"
    log_format: str = "json"
    spool_dir: Path = Path("./spool")
    # Diagnostics (docs/metrics.md): a JSON line per 100 ms of what the process waited on.
    slice_log: Path | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    shutdown_delay: float = 5.0
    drain_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    body_timeout: float = 10.0
    fast_path: bool = True
    max_in_flight: int = 1000
    allowed_cidrs: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    redis_url: str | None = field(default=None, repr=False)
    # RELAY_REDIS_MODE: standalone (one URL), cluster (seed nodes) or sentinel (the sentinels).
    redis_mode: str = "standalone"
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = field(default=None, repr=False)
    redis_username: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    redis_wait_replicas: int | None = None  # None: 0 standalone, 1 cluster and sentinel
    redis_wait_timeout: float = 0.5
    enrichment: bool = True
    enrichment_timeout: float = 0.05
    correlation_ttl: int = 7 * 24 * 3600
    correlation_max_entries: int = 100_000
    evidence: bool = False
    evidence_max_bytes: int = 4096
    workers: int = 1
    # -- recall gateway (docs/recall-gateway.md) --
    audit_queues: tuple[str, ...] = ()
    # The history (docs/history.md): a stream bound with message.#, kept for max_age / max_bytes.
    audit_stream: str | None = None
    audit_stream_max_age: str = "90D"
    audit_stream_max_bytes: int = 20_000_000_000
    # caller NAME -> its API tokens (several during a rotation), unscoped. Never printed.
    api_tokens: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    # RELAY_API_KEYS_FILE, and the scoped keys read from it at start (docs/recall-gateway.md).
    api_keys_file: Path | None = None
    api_keys: tuple[ApiKey, ...] = field(default=(), repr=False)
    api_host: str = "127.0.0.1"  # the API asks Tencent to delete messages: not on every interface by default
    api_port: int = 8081
    api_max_connections: int = 256
    # Moderator ID tokens (JWT): the issuer's keys from a file or a URL, and what the token must say.
    api_jwks_file: Path | None = None
    api_jwks_url: str | None = None
    api_jwt_issuer: str | None = None
    api_jwt_audience: str | None = None
    api_jwt_claim: str = "sub"
    tencent_api_url: str = "https://console.tim.qq.com"
    tencent_admin: str = "administrator"
    # SdkAppid -> the console's secret key. Never printed, logged or put in an event.
    tencent_secret_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    tencent_rate: float = 150.0
    tencent_timeout: float = 5.0
    recall_ttl: int = 24 * 3600
    recall_join_ttl: int = 600
    spool_gateway_share: float = 0.25
    command_queue: str | None = None
    command_reply_prefix: str | None = None
    # Matrix application service (docs/matrix.md): its routes exist only while matrix_hs_token is
    # set. The AS token is ours, only printed into the registration. Never printed otherwise.
    matrix_hs_token: str | None = field(default=None, repr=False)
    matrix_as_token: str | None = field(default=None, repr=False)
    matrix_max_body_bytes: int = 8 * 1024 * 1024

    def shown(self) -> dict[str, object]:
        """Every setting as it may be printed: secrets as ``***`` (or, for keys and tokens, their
        names or apps only), URLs without their passwords."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.repr:
                out[f.name] = value
            elif f.name == "amqp_url":
                out[f.name] = redact(value)
            elif f.name == "redis_url":
                out[f.name] = ",".join(redact_url(u) for u in value.split(",")) if value else None
            elif f.name in ("redis_sentinel_password", "redis_password"):
                out[f.name] = "***" if value else None
            elif f.name in ("callback_tokens", "api_tokens", "tencent_secret_keys"):
                out[f.name] = {name: "***" for name in value}
            elif f.name == "api_keys":
                out[f.name] = [key.name for key in value]
            elif value:  # the Matrix tokens
                out[f.name] = "***"
        return out

    @property
    def redis_options(self) -> RedisOptions | None:
        """What the store's Redis client is built from; None without RELAY_REDIS_URL."""
        if not self.redis_url:
            return None
        return RedisOptions(
            urls=split_urls(self.redis_url),
            mode=cast(Mode, self.redis_mode),
            sentinel_master=self.redis_sentinel_master,
            sentinel_password=self.redis_sentinel_password,
            username=self.redis_username,
            password=self.redis_password,
            wait_replicas=self.redis_wait_replicas,
            wait_timeout=self.redis_wait_timeout,
        )

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{name}={value!r}" for name, value in self.shown().items()) + ")"

    @property
    def warnings(self) -> dict[str, str]:
        """What is valid but probably not meant, by code (``relay check-config`` prints them, ``serve``
        logs each as ``relay.<code>``)."""
        out: dict[str, str] = {}
        if self.gateway and not self.audit_queues and self.audit_stream is None:
            out["gateway_without_audit_queue"] = (
                "the recall gateway is on but RELAY_AUDIT_QUEUES is empty: nothing binds message.#, so the audit"
                " events (message.recall_requested, message.recall_failed) are returned as unroutable and wait in"
                " the spool, and every later event waits behind them (RELAY_AUDIT_STREAM binds message.# too)"
            )
        if self.api_tokens:
            out["api_tokens_unscoped"] = (
                f"RELAY_API_TOKENS keys ({', '.join(sorted(self.api_tokens))}) are unscoped: they may recall in every"
                " app and conversation naming any moderator; prefer RELAY_API_KEYS_FILE"
            )
        return out

    @property
    def amqp_endpoints(self) -> tuple[Endpoint, ...]:
        """The broker nodes of ``RELAY_AMQP_URL``, in the order they are tried."""
        return parse_endpoints(self.amqp_url)

    @property
    def accepted_apps(self) -> frozenset[str]:
        """Every SdkAppid the relay serves: listed, or holding a callback token."""
        return self.sdkappids | frozenset(self.callback_tokens)

    @property
    def gateway(self) -> bool:
        """The recall gateway is on: an API token or key, or a command queue is configured."""
        return bool(self.api_tokens) or bool(self.api_keys) or self.command_queue is not None

    @property
    def all_api_keys(self) -> tuple[ApiKey, ...]:
        """Every caller: the keys file's scoped keys and ``RELAY_API_TOKENS``' unscoped ones."""
        return self.api_keys + legacy_keys(self.api_tokens)

    @property
    def api(self) -> bool:
        """``POST /v1/recalls`` is served (some key can call it)."""
        return bool(self.api_tokens) or bool(self.api_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, require_apps: bool = True) -> Settings:
        """Build settings from ``RELAY_*`` variables; raise ``ConfigError`` naming every bad one.

        ``require_apps=False`` is for operator commands (``relay spool …``) that serve no callbacks.
        """
        problems: list[str] = []
        values: dict[str, object] = {}

        def get(name: str) -> str | None:
            raw = env.get(name)
            return raw.strip() if raw is not None and raw.strip() != "" else None

        def number(name: str, key: str, kind: type[int] | type[float], low: float, high: float) -> None:
            raw = get(name)
            if raw is None:
                return
            try:
                value = kind(raw)
            except ValueError:
                problems.append(f"{name}: expected a number, got {raw!r}")
                return
            if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
                problems.append(f"{name}: must be between {low:g} and {high:g}, got {raw!r}")
                return
            values[key] = value

        url = get("RELAY_AMQP_URL")
        if url is not None:
            try:
                parse_endpoints(url)
            except EndpointError as exc:
                problems.append(f"RELAY_AMQP_URL: {exc}")
            else:
                values["amqp_url"] = url

        exchange = get("RELAY_EXCHANGE")
        if exchange is not None:
            if exchange.startswith("amq.") or not _AMQP_NAME.fullmatch(exchange):
                problems.append(f"RELAY_EXCHANGE: {exchange!r} is reserved, too long or {_NAME_RULE}")
            else:
                values["exchange"] = exchange

        for name, key in (("RELAY_QUEUES", "queues"), ("RELAY_AUDIT_QUEUES", "audit_queues")):
            queues = _split(get(name))
            if any(q.startswith("amq.") or not _AMQP_NAME.fullmatch(q) for q in queues):
                problems.append(f"{name}: a name is reserved ('amq.'), too long or {_NAME_RULE}")
            elif len(set(queues)) != len(queues):
                problems.append(f"{name}: a queue is listed twice")
            else:
                values[key] = tuple(queues)
        if set(cast(tuple[str, ...], values.get("queues", ()))) & set(
            cast(tuple[str, ...], values.get("audit_queues", ()))
        ):
            problems.append("RELAY_AUDIT_QUEUES: a queue is also in RELAY_QUEUES (one binding each)")

        _stream_from_env(get, number, values, problems)

        host = get("RELAY_HOST")
        if host is not None:
            values["host"] = host
        number("RELAY_PORT", "port", int, 0, 65535)

        apps = _split(get("RELAY_SDKAPPIDS"))
        bad_apps = [a for a in apps if not a.isdigit()]
        if bad_apps:
            problems.append(f"RELAY_SDKAPPIDS: SdkAppids are digits, got {bad_apps!r}")
        values["sdkappids"] = frozenset(a for a in apps if a.isdigit())

        tokens: dict[str, list[str]] = {}
        pairs = _split(get("RELAY_CALLBACK_TOKENS"))
        for position, pair in enumerate(pairs, start=1):
            app, sep, token = pair.partition("=")
            app, token = app.strip(), token.strip()
            if not sep or not app.isdigit() or not token:
                # By position only: a pair without "=" may be a bare token, a secret.
                problems.append(_pair_problem("RELAY_CALLBACK_TOKENS", position, len(pairs), "SDKAPPID=TOKEN"))
                continue
            tokens.setdefault(app, [])
            if token not in tokens[app]:
                tokens[app].append(token)
        values["callback_tokens"] = {app: tuple(ts) for app, ts in tokens.items()}

        # Matrix: either token may be set alone (the AS token only matters to the registration).
        for name, key in (("RELAY_MATRIX_HS_TOKEN", "matrix_hs_token"), ("RELAY_MATRIX_AS_TOKEN", "matrix_as_token")):
            raw = get(name)
            if raw is None:
                continue
            if not _MATRIX_TOKEN.fullmatch(raw):
                # The value is a secret: say what is wrong with it, never what it is.
                problems.append(f"{name}: {_MATRIX_SHAPE_RULE} (got {len(raw)} characters)")
            else:
                values[key] = raw
        if values.get("matrix_hs_token") is not None and values.get("matrix_hs_token") == values.get("matrix_as_token"):
            problems.append("RELAY_MATRIX_AS_TOKEN: must differ from RELAY_MATRIX_HS_TOKEN")
        number("RELAY_MATRIX_MAX_BODY_BYTES", "matrix_max_body_bytes", int, 65536, 64 * 1024 * 1024)

        matrix = "matrix_hs_token" in values
        if require_apps and not values["sdkappids"] and not tokens and not bad_apps and not matrix:
            problems.append(
                "RELAY_SDKAPPIDS: no app is accepted; set RELAY_SDKAPPIDS and/or RELAY_CALLBACK_TOKENS"
                " (or RELAY_MATRIX_HS_TOKEN for Matrix alone)"
            )

        number("RELAY_SIGNATURE_MAX_AGE", "signature_max_age", int, 1, 86400)
        number("RELAY_MAX_BODY_BYTES", "max_body_bytes", int, 1024, 16 * 1024 * 1024)
        number("RELAY_PUBLISH_TIMEOUT", "publish_timeout", float, 0.05, 120)
        number("RELAY_SPOOL_MAX_BYTES", "spool_max_bytes", int, 1024 * 1024, 1 << 50)
        number("RELAY_SHUTDOWN_DELAY", "shutdown_delay", float, 0, 600)
        number("RELAY_DRAIN_TIMEOUT", "drain_timeout", float, 0, 600)
        number("RELAY_KEEPALIVE_TIMEOUT", "keepalive_timeout", float, 0.5, 3600)
        number("RELAY_BODY_TIMEOUT", "body_timeout", float, 0.5, 600)
        number("RELAY_MAX_IN_FLIGHT", "max_in_flight", int, 1, 1_000_000)
        for name, key in (("RELAY_ALLOWED_CIDRS", "allowed_cidrs"), ("RELAY_TRUSTED_PROXIES", "trusted_proxies")):
            try:
                values[key] = parse_networks(_split(get(name)))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")

        number("RELAY_ENRICHMENT_TIMEOUT", "enrichment_timeout", float, 0.001, 5)
        number("RELAY_CORRELATION_TTL", "correlation_ttl", int, 1, 366 * 24 * 3600)
        number("RELAY_CORRELATION_MAX_ENTRIES", "correlation_max_entries", int, 1, 100_000_000)
        number("RELAY_EVIDENCE_MAX_BYTES", "evidence_max_bytes", int, 64, 1024 * 1024)
        number("RELAY_WORKERS", "workers", int, 1, 64)
        for name, key in (
            ("RELAY_ENRICHMENT", "enrichment"),
            ("RELAY_EVIDENCE", "evidence"),
            ("RELAY_HTTP_FAST_PATH", "fast_path"),
        ):
            raw = get(name)
            if raw is None:
                continue
            if raw.lower() in _ON | _OFF:
                values[key] = raw.lower() in _ON
            else:
                problems.append(f"{name}: expected on or off, got {raw!r}")
        _redis(get, values, problems)

        spool_dir = get("RELAY_SPOOL_DIR")
        if spool_dir is not None:
            values["spool_dir"] = Path(spool_dir)
        slice_log = get("RELAY_SLICE_LOG")
        if slice_log is not None:
            values["slice_log"] = Path(slice_log)

        for name, key, allowed in (
            ("RELAY_LOG_LEVEL", "log_level", _LOG_LEVELS),
            ("RELAY_LOG_FORMAT", "log_format", _LOG_FORMATS),
        ):
            raw = get(name)
            if raw is None:
                continue
            if raw.lower() not in allowed:
                problems.append(f"{name}: expected one of {', '.join(allowed)}, got {raw!r}")
            else:
                values[key] = raw.lower()

        _gateway_from_env(get, number, values, problems)
        gateway_api = bool(values.get("api_tokens")) or "api_keys_file" in values
        port, api_port = values.get("port", 8080), values.get("api_port", 8081)
        if gateway_api and port == api_port and port != 0:
            # Two listeners on one port: with --workers (SO_REUSEPORT) both start and the kernel
            # hands each connection to either, so Tencent's callbacks would get the API's 404s.
            problems.append(f"RELAY_API_PORT: {api_port} is also RELAY_PORT; the recall API needs a port of its own")
        if problems:
            raise ConfigError(problems)
        return cls(**values)  # type: ignore[arg-type]


def _redis(get: Callable[[str], str | None], values: dict[str, object], problems: list[str]) -> None:
    """RELAY_REDIS_*: the mode, its URLs (one, or several comma-separated), credentials, WAIT."""
    mode = (get("RELAY_REDIS_MODE") or "standalone").lower()
    if mode not in ("standalone", "cluster", "sentinel"):
        problems.append(f"RELAY_REDIS_MODE: expected standalone, cluster or sentinel, got {mode!r}")
        return
    values["redis_mode"] = mode
    raw = get("RELAY_REDIS_URL")
    urls = [u.strip() for u in (raw or "").split(",") if u.strip()]
    if raw is not None:
        schemes = ("redis", "rediss", "unix") if mode == "standalone" else ("redis", "rediss")
        bad = [u for u in urls if urlsplit(u).scheme not in schemes]
        if not urls:
            problems.append("RELAY_REDIS_URL: empty")
        elif bad:
            allowed = ", ".join(f"{s}://" for s in schemes)
            problems.append(f"RELAY_REDIS_URL: must start with {allowed}, got {redact_url(bad[0])!r}")
        elif not all(_port_ok(u) for u in urls):
            problems.append("RELAY_REDIS_URL: the port must be a number from 1 to 65535")
        elif mode == "standalone" and len(urls) > 1:
            problems.append(
                "RELAY_REDIS_URL: one URL in standalone mode (several: set RELAY_REDIS_MODE=cluster or sentinel)"
            )
        else:
            values["redis_url"] = ",".join(urls)
    elif mode != "standalone":
        problems.append(f"RELAY_REDIS_URL: required with RELAY_REDIS_MODE={mode}")
    master = get("RELAY_REDIS_SENTINEL_MASTER")
    if mode == "sentinel" and not master:
        problems.append("RELAY_REDIS_SENTINEL_MASTER: required with RELAY_REDIS_MODE=sentinel (the primary's name)")
    elif master and mode != "sentinel":
        problems.append("RELAY_REDIS_SENTINEL_MASTER: only with RELAY_REDIS_MODE=sentinel")
    else:
        values["redis_sentinel_master"] = master
    for name, key in (
        ("RELAY_REDIS_SENTINEL_PASSWORD", "redis_sentinel_password"),
        ("RELAY_REDIS_USERNAME", "redis_username"),
        ("RELAY_REDIS_PASSWORD", "redis_password"),
    ):
        value = get(name)
        if value is not None:
            values[key] = value
    replicas = get("RELAY_REDIS_WAIT_REPLICAS")
    if replicas is not None:
        if replicas.isdigit() and int(replicas) <= 16:
            values["redis_wait_replicas"] = int(replicas)
        else:
            problems.append(f"RELAY_REDIS_WAIT_REPLICAS: expected a number from 0 to 16, got {replicas!r}")
    timeout = get("RELAY_REDIS_WAIT_TIMEOUT")
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = -1.0
        if 0.001 <= seconds <= 10:
            values["redis_wait_timeout"] = seconds
        else:
            problems.append(f"RELAY_REDIS_WAIT_TIMEOUT: expected seconds from 0.001 to 10, got {timeout!r}")


# RabbitMQ's x-max-age: a positive number and one unit (Y, M, D, h, m, s), e.g. 90D, 12h.
_MAX_AGE = re.compile(r"[1-9][0-9]{0,8}[YMDhms]")


def _stream_from_env(
    get: Callable[[str], str | None],
    number: Callable[[str, str, type[int] | type[float], float, float], None],
    values: dict[str, object],
    problems: list[str],
) -> None:
    """RELAY_AUDIT_STREAM and its retention (docs/history.md)."""
    stream = get("RELAY_AUDIT_STREAM")
    if stream is not None:
        taken = set(cast(tuple[str, ...], values.get("queues", ()))) | set(
            cast(tuple[str, ...], values.get("audit_queues", ()))
        )
        if stream.startswith("amq.") or not _AMQP_NAME.fullmatch(stream):
            problems.append(f"RELAY_AUDIT_STREAM: {stream!r} is reserved, too long or {_NAME_RULE}")
        elif stream in taken:
            problems.append("RELAY_AUDIT_STREAM: also in RELAY_QUEUES or RELAY_AUDIT_QUEUES (a stream is not a queue)")
        else:
            values["audit_stream"] = stream
    max_age = get("RELAY_AUDIT_STREAM_MAX_AGE")
    if max_age is not None:
        if not _MAX_AGE.fullmatch(max_age):
            problems.append(
                f"RELAY_AUDIT_STREAM_MAX_AGE: expected a number and one of Y M D h m s (RabbitMQ's x-max-age,"
                f" e.g. 90D or 12h), got {max_age!r}"
            )
        else:
            values["audit_stream_max_age"] = max_age
    number("RELAY_AUDIT_STREAM_MAX_BYTES", "audit_stream_max_bytes", int, 1024 * 1024, 1 << 50)


def _port_ok(url: str) -> bool:
    try:
        port = urlsplit(url).port
    except ValueError:
        return False
    return port is None or port > 0


def _split(raw: str | None) -> list[str]:
    return [item.strip() for item in (raw or "").split(",") if item.strip()]


_API_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MIN_API_TOKEN = 16


def _gateway_from_env(
    get: Callable[[str], str | None],
    number: Callable[[str, str, type[int] | type[float], float, float], None],
    values: dict[str, object],
    problems: list[str],
) -> None:
    """The recall gateway's RELAY_API_* / RELAY_TENCENT_* / RELAY_RECALL_* / RELAY_COMMAND_QUEUE settings."""
    tokens: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    pairs = _split(get("RELAY_API_TOKENS"))
    for position, pair in enumerate(pairs, start=1):
        name, sep, token = (part.strip() for part in pair.partition("="))
        # By position only: a pair without "=" may be a bare token, a secret.
        if not sep:
            problems.append(_pair_problem("RELAY_API_TOKENS", position, len(pairs), "NAME=TOKEN"))
            continue
        if not _API_NAME.fullmatch(name):
            problems.append(
                _pair_problem("RELAY_API_TOKENS", position, len(pairs), "NAME=TOKEN")
                + ": the NAME may hold only A-Z a-z 0-9 _ . - (at most 64)"
            )
            continue
        if len(token) < _MIN_API_TOKEN:
            problems.append(
                f"RELAY_API_TOKENS: the token of {name!r} (pair {position} of {len(pairs)}) is shorter than"
                f" {_MIN_API_TOKEN} characters"
            )
            continue
        if owner.setdefault(token, name) != name:
            problems.append(f"RELAY_API_TOKENS: {name!r} and {owner[token]!r} share a token")
            continue
        tokens.setdefault(name, [])
        if token not in tokens[name]:
            tokens[name].append(token)
    values["api_tokens"] = {name: tuple(ts) for name, ts in tokens.items()}
    api_host = get("RELAY_API_HOST")
    if api_host is not None:
        values["api_host"] = api_host
    number("RELAY_API_PORT", "api_port", int, 0, 65535)
    number("RELAY_API_MAX_CONNECTIONS", "api_max_connections", int, 1, 100_000)

    url = get("RELAY_TENCENT_API_URL")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.path not in ("", "/"):
            problems.append(f"RELAY_TENCENT_API_URL: expected https://<domain>, got {redact_url(url)!r}")
        else:
            values["tencent_api_url"] = url.rstrip("/")
    admin = get("RELAY_TENCENT_ADMIN")
    if admin is not None:
        values["tencent_admin"] = admin
    keys: dict[str, str] = {}
    pairs = _split(get("RELAY_TENCENT_SECRET_KEYS"))
    for position, pair in enumerate(pairs, start=1):
        app, sep, key = (part.strip() for part in pair.partition("="))
        if not sep or not app.isdigit() or not key:
            problems.append(_pair_problem("RELAY_TENCENT_SECRET_KEYS", position, len(pairs), "SDKAPPID=KEY"))
        elif app in keys:
            problems.append(f"RELAY_TENCENT_SECRET_KEYS: app {app} is listed twice")
        else:
            keys[app] = key
    values["tencent_secret_keys"] = keys
    accepted = cast(frozenset[str], values.get("sdkappids", frozenset())) | frozenset(
        cast(Mapping[str, object], values.get("callback_tokens", {}))
    )
    strays = sorted(app for app in keys if app not in accepted)
    if strays:
        problems.append(
            f"RELAY_TENCENT_SECRET_KEYS: app(s) {', '.join(strays)} not in RELAY_SDKAPPIDS or RELAY_CALLBACK_TOKENS:"
            " their recall callbacks would be refused and never joined to a request"
        )
    unsigned = sorted(app for app in keys if app not in cast(Mapping[str, object], values.get("callback_tokens", {})))
    if unsigned:
        # A gateway request's join record would attribute a callback anyone could forge unsigned.
        problems.append(
            f"RELAY_TENCENT_SECRET_KEYS: app(s) {', '.join(unsigned)} have a secret key but no callback token in"
            " RELAY_CALLBACK_TOKENS: their recall callbacks cannot be told from forgeries, so none may be joined"
            " to a request"
        )
    number("RELAY_TENCENT_RATE", "tencent_rate", float, 1, 200)
    number("RELAY_TENCENT_TIMEOUT", "tencent_timeout", float, 0.1, 60)
    number("RELAY_RECALL_TTL", "recall_ttl", int, 60, 30 * 24 * 3600)
    number("RELAY_RECALL_JOIN_TTL", "recall_join_ttl", int, 30, 24 * 3600)
    number("RELAY_SPOOL_GATEWAY_SHARE", "spool_gateway_share", float, 0.0, 1.0)
    for name, key in (("RELAY_COMMAND_QUEUE", "command_queue"), ("RELAY_COMMAND_REPLY_PREFIX", "command_reply_prefix")):
        queue = get(name)
        if queue is None:
            continue
        if queue.startswith("amq.") or not _AMQP_NAME.fullmatch(queue):
            problems.append(f"{name}: {queue!r} is reserved, too long or {_NAME_RULE}")
        else:
            values[key] = queue
    _api_keys_from_env(get, values, problems, keys)
    _jwt_from_env(get, values, problems)


def _pair_problem(setting: str, position: int, count: int, shape: str) -> str:
    """A malformed pair named by its position only: its text may be a secret."""
    return f"{setting}: pair {position} of {count} is malformed (expected {shape})"


def _api_keys_from_env(
    get: Callable[[str], str | None], values: dict[str, object], problems: list[str], secret_keys: Mapping[str, str]
) -> None:
    """RELAY_API_KEYS_FILE, checked against the secret keys, the legacy tokens and the command queue."""
    path = get("RELAY_API_KEYS_FILE")
    scoped: tuple[ApiKey, ...] = ()
    if path is not None:
        values["api_keys_file"] = Path(path)
        try:
            scoped = load_keys(Path(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
        values["api_keys"] = scoped
    legacy = legacy_keys(cast(Mapping[str, tuple[str, ...]], values.get("api_tokens", {})))
    problems.extend(
        p.replace("RELAY_API_KEYS_FILE", "RELAY_API_KEYS_FILE / RELAY_API_TOKENS")
        for p in check_keys((*scoped, *legacy), secret_keys)
    )
    if values.get("command_queue") is not None and not any(k.amqp_user for k in scoped) and path is not None:
        problems.append(
            "RELAY_COMMAND_QUEUE: no key in RELAY_API_KEYS_FILE has an amqp_user, so every command would be refused"
        )
    elif values.get("command_queue") is not None and path is None:
        problems.append(
            "RELAY_COMMAND_QUEUE: needs RELAY_API_KEYS_FILE with a key whose amqp_user names the RabbitMQ user"
            " that publishes commands (the command queue accepts only callers it can name)"
        )


def _jwt_from_env(get: Callable[[str], str | None], values: dict[str, object], problems: list[str]) -> None:
    """RELAY_API_JWKS_FILE or RELAY_API_JWKS_URL, with the issuer, audience and claim moderator tokens need."""
    jwks_file, jwks_url = get("RELAY_API_JWKS_FILE"), get("RELAY_API_JWKS_URL")
    names = ("RELAY_API_JWT_ISSUER", "RELAY_API_JWT_AUDIENCE", "RELAY_API_JWT_CLAIM")
    if jwks_file is None and jwks_url is None:
        for name in names:
            if get(name) is not None:
                problems.append(f"{name}: set RELAY_API_JWKS_FILE or RELAY_API_JWKS_URL too")
        return
    if jwks_file is not None and jwks_url is not None:
        problems.append("RELAY_API_JWKS_URL: set it or RELAY_API_JWKS_FILE, not both")
        return
    if jwks_file is not None:
        values["api_jwks_file"] = Path(jwks_file)
        try:
            load_jwks_file(Path(jwks_file))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if jwks_url is not None:
        parts = urlsplit(jwks_url)
        loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
        if not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
            problems.append(f"RELAY_API_JWKS_URL: expected an https:// URL, got {redact_url(jwks_url)!r}")
        else:
            values["api_jwks_url"] = jwks_url
    for name, key in zip(names[:2], ("api_jwt_issuer", "api_jwt_audience"), strict=True):
        raw = get(name)
        if raw is None:
            problems.append(f"{name}: required with a JWKS (a token is only checked against one issuer and audience)")
        else:
            values[key] = raw
    claim = get("RELAY_API_JWT_CLAIM")
    if claim is not None:
        values["api_jwt_claim"] = claim
