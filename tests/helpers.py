"""Test helpers shared by the tiers: a recording publisher, the event schema, settings builders."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import orjson

from relay.errors import PublishFailed
from relay.events import Envelope
from relay.gateway.request import RecallCommand, parse_request
from relay.settings import Settings
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import sample_body

APP = "1400000001"
TOKEN = "tok_example_42"
OTHER_APP = "1400000002"  # accepted without a token
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
AMQP_URL = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def answers(url: str, default_port: int) -> bool:
    """Whether something accepts TCP connections at *url*'s host and port (2 s)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema the package ships (relay/schema/<name>)."""
    loaded: dict[str, Any] = json.loads(resources.files("relay").joinpath(f"schema/{name}").read_text(encoding="utf-8"))
    return loaded


EVENT_SCHEMA = load_schema("event.v4.json")
_VALIDATOR = jsonschema.Draft202012Validator(EVENT_SCHEMA, format_checker=jsonschema.FormatChecker())


def validate_event(body: dict[str, Any]) -> None:
    """Raise if *body* does not satisfy the published JSON Schema."""
    _VALIDATOR.validate(body)


def envelopes(n: int, kind: str = "c2c") -> list[Envelope]:
    """*n* fresh sample callbacks of *kind*, normalized into envelopes."""
    out: list[Envelope] = []
    for _ in range(n):
        body = orjson.dumps(sample_body(kind))
        out.extend(e.envelope() for e in normalize(body, CallbackQuery(sdk_app_id=APP), 0).events)
    return out


def make_settings(spool_dir: Path, **overrides: str) -> Settings:
    env = {
        "RELAY_SDKAPPIDS": f"{APP},{OTHER_APP}",
        "RELAY_CALLBACK_TOKENS": f"{APP}={TOKEN}",
        "RELAY_SPOOL_DIR": str(spool_dir),
        **overrides,
    }
    return Settings.from_env(env)


class RecordingPublisher:
    """A publisher twin: records what it is asked to publish; can be told to fail or stall."""

    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.ready_flag = True
        self.fail_with: str | None = None
        self.fail_event_ids: set[str] = set()
        self.delay = 0.0
        self.started = False
        self.closed = False
        self.endpoint: str | None = "recording:5672"
        self.connections = 1

    @property
    def ready(self) -> bool:
        return self.ready_flag

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def publish(self, envelope: Envelope) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None or envelope.event_id in self.fail_event_ids:
            raise PublishFailed(self.fail_with or "returned", "told to fail", in_doubt=self.fail_with == "timeout")
        self.published.append(envelope)


def recall_command(
    conversation: dict[str, Any],
    messages: list[dict[str, Any]],
    reason: str = "spam link",
    request_id: str = "ticket-4711",
) -> RecallCommand:
    """A validated recall-gateway request from moderator mod_7 of app APP."""
    body = {
        "requestID": request_id,
        "sdkAppID": APP,
        "conversation": conversation,
        "messages": messages,
        "reason": reason,
        "moderator": {"userID": "mod_7"},
    }
    return parse_request(orjson.dumps(body), new_id=lambda: "x")


def load_example(filename: str) -> ModuleType:
    """Import examples/<filename> as a module (examples/ is scripts, not a package)."""
    path = Path(__file__).parents[1] / "examples" / filename
    spec = importlib.util.spec_from_file_location(f"revoke_relay_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module
