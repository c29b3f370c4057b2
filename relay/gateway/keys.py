"""API keys: who may ask the relay to recall, in which apps and conversations, naming whom.

``RELAY_API_KEYS_FILE`` is a TOML file with one ``[[key]]`` table per calling service. It holds
the SHA-256 of each token, never a token, so the file (a Kubernetes Secret) does not hand out the
power it describes. ``RELAY_API_TOKENS`` pairs still work as unscoped keys (every app with a
secret key, every conversation, any moderator). Parsing is pure; :class:`Keyring` is what the
API and the command queue ask, and it is swapped whole when the file is reloaded (SIGHUP).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from relay.errors import ConfigError
from relay.gateway.ratelimit import TokenBucket
from relay.gateway.text import refusal

CONVERSATIONS = frozenset({"c2c", "group", "official_account"})
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_RATE = 10.0  # requests per second per key; a request holds up to 100 messages
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset(
    {"name", "sha256", "apps", "conversations", "moderators", "rate", "amqp_user", "require_verified_moderator"}
)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One caller. ``apps`` None: every app with a secret key. ``scoped`` False: from
    ``RELAY_API_TOKENS`` (no limits but the apps with a secret key)."""

    name: str
    digests: tuple[bytes, ...]
    apps: frozenset[str] | None = None
    conversations: frozenset[str] = CONVERSATIONS
    moderators: tuple[str, ...] = ("*",)
    rate: float | None = None
    amqp_user: str | None = None
    require_verified_moderator: bool = False
    scoped: bool = False

    def allows_app(self, app: str) -> bool:
        return self.apps is None or app in self.apps

    def allows_moderator(self, user_id: str) -> bool:
        """Whether this caller may name *user_id* as the moderator (case-sensitive glob patterns)."""
        return any(fnmatchcase(user_id, pattern) for pattern in self.moderators)


def digest(token: str) -> bytes:
    """SHA-256 of a token, as the keys file holds it (hex there)."""
    return hashlib.sha256(token.encode()).digest()


def legacy_keys(tokens: Mapping[str, Sequence[str]]) -> tuple[ApiKey, ...]:
    """``RELAY_API_TOKENS`` as unscoped keys."""
    return tuple(ApiKey(name, tuple(digest(t) for t in ts)) for name, ts in tokens.items())


def load_keys(path: Path) -> tuple[ApiKey, ...]:
    """Read and validate the keys file; raise :class:`ConfigError` naming each problem by key and
    field (never a value from the file: a mistyped hash may be a pasted token)."""
    setting = "RELAY_API_KEYS_FILE"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{setting}: cannot read {path}: {exc.strerror or type(exc).__name__}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{setting}: {path} is not UTF-8"]) from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give the position ("Invalid value (at line 3, column 10)"), not the text.
        raise ConfigError([f"{setting}: {path} is not valid TOML: {exc}"]) from None
    problems: list[str] = []
    for extra in sorted(set(data) - {"key"}):
        problems.append(f"{setting}: unknown top-level entry {extra[:40]!r} (expected [[key]] tables)")
    tables = data.get("key", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError([*problems, f"{setting}: 'key' must be an array of tables ([[key]])"])
    keys = [_key(index, table, problems) for index, table in enumerate(tables, start=1)]
    problems += _duplicates(k for k in keys if k is not None)
    if problems:
        raise ConfigError(problems)
    return tuple(k for k in keys if k is not None)


def check_keys(keys: Sequence[ApiKey], secret_apps: Iterable[str]) -> list[str]:
    """Problems across keys and settings: names and tokens unique, each scoped app with a secret key."""
    problems = _duplicates(keys)
    configured = set(secret_apps)
    for key in keys:
        missing = sorted((key.apps or set()) - configured)
        if missing:
            problems.append(
                f"RELAY_API_KEYS_FILE: key {key.name!r} names app(s) {', '.join(missing)} without a secret key"
                " in RELAY_TENCENT_SECRET_KEYS"
            )
    return problems


def _duplicates(keys: Iterable[ApiKey]) -> list[str]:
    problems: list[str] = []
    names: set[str] = set()
    users: dict[str, str] = {}
    owners: dict[bytes, str] = {}
    for key in keys:
        if key.name in names:
            problems.append(f"RELAY_API_KEYS_FILE: key name {key.name!r} is used twice")
        names.add(key.name)
        if key.amqp_user is not None and users.setdefault(key.amqp_user, key.name) != key.name:
            problems.append(f"RELAY_API_KEYS_FILE: keys {users[key.amqp_user]!r} and {key.name!r} share an amqp_user")
        for d in key.digests:
            if owners.setdefault(d, key.name) != key.name:
                problems.append(f"RELAY_API_KEYS_FILE: keys {owners[d]!r} and {key.name!r} share a token")
    return problems


def _key(index: int, table: dict[str, object], problems: list[str]) -> ApiKey | None:
    raw_name = table.get("name")
    name = raw_name if isinstance(raw_name, str) and NAME.fullmatch(raw_name) else None
    where = f"RELAY_API_KEYS_FILE: [[key]] #{index}" + (f" ({name!r})" if name else "")
    before = len(problems)

    def fail(message: str) -> None:
        problems.append(f"{where}: {message}")

    for extra in sorted(set(table) - _FIELDS):
        fail(f"unknown field {extra[:40]!r}")
    if name is None:
        fail("name is required: 1-64 characters of A-Z a-z 0-9 _ . -")
    digests = _strings(table.get("sha256"))
    if not digests or not all(_HEX64.fullmatch(d.lower()) for d in digests):
        fail("sha256 is required: the hex SHA-256 of the token (or a list of them during a rotation)")
    apps = _strings(table.get("apps"))
    if apps is None or not apps or not all(a == "*" or (a.isascii() and a.isdigit()) for a in apps):
        fail('apps is required: a list of SDKAppIDs, or ["*"] for every app with a secret key')
    conversations = _strings(table.get("conversations", sorted(CONVERSATIONS)))
    if conversations is None or not conversations or not set(conversations) <= CONVERSATIONS:
        fail("conversations must list some of c2c, group, official_account")
    moderators = _strings(table.get("moderators", ["*"]))
    if moderators is None or not moderators or any(not m or refusal(m, identifier=True) for m in moderators):
        fail("moderators must be a list of non-empty patterns (glob: * ? [..]) of moderator IDs")
    rate = table.get("rate", DEFAULT_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 10_000:
        fail("rate must be a number of requests per second, above 0 and at most 10000")
    amqp_user = table.get("amqp_user")
    if amqp_user is not None and (not isinstance(amqp_user, str) or not amqp_user or len(amqp_user) > 255):
        fail("amqp_user must be a RabbitMQ user name")
    verified = table.get("require_verified_moderator", False)
    if not isinstance(verified, bool):
        fail("require_verified_moderator must be true or false")
    if len(problems) > before:
        return None
    assert name is not None
    assert digests is not None
    assert apps is not None
    assert conversations is not None
    assert moderators is not None
    assert isinstance(rate, int | float)
    return ApiKey(
        name=name,
        digests=tuple(bytes.fromhex(d) for d in digests),
        apps=None if "*" in apps else frozenset(apps),
        conversations=frozenset(conversations),
        moderators=tuple(moderators),
        rate=float(rate),
        amqp_user=amqp_user if isinstance(amqp_user, str) else None,
        require_verified_moderator=bool(verified),
        scoped=True,
    )


def _strings(value: object) -> list[str] | None:
    """A string or a list of strings as a list; None for anything else."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


class Keyring:
    """The keys in force: who a bearer token or an AMQP user is, and each key's request rate."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys: tuple[ApiKey, ...] = ()
        self._buckets: dict[str, TokenBucket] = {}
        self.replace(keys)

    def replace(self, keys: Sequence[ApiKey]) -> None:
        """Put *keys* in force at once (a reload); a key whose rate is unchanged keeps its bucket."""
        old = {k.name: k for k in self.keys}
        buckets = {}
        for key in keys:
            if key.rate is None:
                continue
            same = old.get(key.name)
            kept = self._buckets.get(key.name) if same is not None and same.rate == key.rate else None
            buckets[key.name] = kept or TokenBucket(key.rate, max(1.0, key.rate))
        self.keys = tuple(keys)
        self._buckets = buckets

    def identify(self, token: bytes) -> ApiKey | None:
        """The key holding *token*, compared in constant time with every token (no early exit)."""
        presented = hashlib.sha256(token).digest()
        found: ApiKey | None = None
        for key in self.keys:
            for d in key.digests:
                if hmac.compare_digest(d, presented):
                    found = key
        return found

    def by_amqp_user(self, user: str) -> ApiKey | None:
        return next((k for k in self.keys if k.amqp_user is not None and k.amqp_user == user), None)

    def bucket(self, key: ApiKey) -> TokenBucket | None:
        """The token bucket of *key*'s ``rate``, or None for an unlimited (legacy) key."""
        return self._buckets.get(key.name)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.keys]
