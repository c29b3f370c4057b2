"""A real Synapse for the tests: generated config (SQLite), the relay's own registration, a client.

:class:`Homeserver` runs one Synapse process on free ports; :class:`Matrix` is a small asynchronous
client of its client-server API (register through the shared secret, rooms, messages, redactions).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

ROOT = Path(__file__).parents[2]
SYNAPSE_PYTHON = Path(os.environ.get("RELAY_SYNAPSE_PYTHON", ROOT / ".tools" / "synapse-venv" / "bin" / "python"))
SERVER_NAME = "localhost"
AS_ID = "revoke-relay"
# A second application service whose hs_token the relay does not know: the homeserver pushes to
# the relay with it, and the relay must refuse. It only watches rooms with a wrongtoken- user in them.
WRONG_AS_ID = "misconfigured"
WRONG_USER_PREFIX = "wrongtoken-"
_GENEROUS = {"per_second": 1000, "burst_count": 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Homeserver:
    """One Synapse process; ``start`` returns once its client API answers."""

    def __init__(self, directory: Path, link_port: int, hs_token: str, as_token: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.link_port = link_port  # where the registration points (tests/synapse/conftest.py: Link)
        self.relay_url = f"http://127.0.0.1:{link_port}"
        self.hs_token = hs_token
        self.as_token = as_token
        self.config = directory / "homeserver.yaml"
        self.log = directory / "homeserver.log"
        self.shared_secret = uuid.uuid4().hex
        self._process: subprocess.Popen[bytes] | None = None

    def configure(self) -> None:
        """Generate Synapse's config, then make it local, quick and free of rate limits."""
        subprocess.run(
            [
                str(SYNAPSE_PYTHON),
                "-m",
                "synapse.app.homeserver",
                f"--server-name={SERVER_NAME}",
                f"--config-path={self.config}",
                f"--data-directory={self.directory}",
                "--generate-config",
                "--report-stats=no",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=self.directory,  # the generated log config names homeserver.log in the working directory
        )
        registration = self.directory / "registration.yaml"
        registration.write_text(self.relay_registration(), encoding="utf-8")
        wrong = self.directory / "wrong-registration.yaml"
        wrong.write_text(
            yaml.safe_dump(
                {
                    "id": WRONG_AS_ID,
                    "url": self.relay_url,
                    "as_token": uuid.uuid4().hex,
                    "hs_token": "not-the-relays-" + uuid.uuid4().hex,
                    "sender_localpart": "misconfigured",
                    "rate_limited": False,
                    "namespaces": {
                        "users": [{"exclusive": False, "regex": f"@{WRONG_USER_PREFIX}.*:{SERVER_NAME}"}],
                        "aliases": [],
                        "rooms": [],
                    },
                }
            ),
            encoding="utf-8",
        )
        # Write log lines at once (the generated config buffers INFO lines for up to 5 s): the
        # tests read the log to see the homeserver fail and retry.
        log_config = Path(yaml.safe_load(self.config.read_text(encoding="utf-8"))["log_config"])
        logging: dict[str, Any] = yaml.safe_load(log_config.read_text(encoding="utf-8"))
        logging["root"]["handlers"] = ["file"]
        log_config.write_text(yaml.safe_dump(logging), encoding="utf-8")
        config: dict[str, Any] = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        config.update(
            listeners=[
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            app_service_config_files=[str(registration), str(wrong)],
            registration_shared_secret=self.shared_secret,
            trusted_key_servers=[],  # no network: never ask matrix.org for keys
            suppress_key_server_warning=True,
            bcrypt_rounds=4,  # password hashing at test speed
            presence={"enabled": False},
            enable_metrics=False,
            url_preview_enabled=False,
            rc_message=_GENEROUS,
            rc_registration=_GENEROUS,
            rc_admin_redaction=_GENEROUS,
            rc_room_creation=_GENEROUS,
            rc_joins_per_room=_GENEROUS,
            rc_login={"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
            rc_joins={"local": _GENEROUS, "remote": _GENEROUS},
            rc_invites={"per_room": _GENEROUS, "per_user": _GENEROUS, "per_issuer": _GENEROUS},
        )
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")

    def relay_registration(self) -> str:
        """The registration, produced the way an operator would: by ``relay matrix-registration``."""
        env = {**os.environ, "RELAY_MATRIX_HS_TOKEN": self.hs_token, "RELAY_MATRIX_AS_TOKEN": self.as_token}
        done = subprocess.run(
            [sys.executable, "-m", "relay", "matrix-registration", "--url", self.relay_url, "--id", AS_ID],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout

    def start(self, timeout: float = 120.0) -> None:
        with (self.directory / "synapse.out").open("wb") as out:
            self._process = subprocess.Popen(
                [str(SYNAPSE_PYTHON), "-m", "synapse.app.homeserver", "-c", str(self.config)],
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"Synapse exited with {self._process.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=2):  # noqa: S310 - local
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Synapse did not answer within {timeout}s: {self.tail()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def tail(self, chars: int = 3000) -> str:
        parts = []
        for path in (self.directory / "synapse.out", self.log):
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace")[-chars:])
        return "\n".join(parts)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


@dataclass(frozen=True)
class User:
    user_id: str
    token: str


class Matrix:
    """A client of the homeserver's client-server API, as the tests' users."""

    def __init__(self, homeserver: Homeserver, session: aiohttp.ClientSession) -> None:
        self.hs = homeserver
        self.session = session

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.hs.url + path, json=body, headers=headers) as response:
            reply = await response.json()
            if response.status != 200:
                raise AssertionError(f"{method} {path} -> {response.status} {reply}")
            return reply

    async def register(self, name: str) -> User:
        """A new user with a unique localpart starting with *name*, through the shared secret."""
        localpart = f"{name}-{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        nonce = (await self.call("GET", "/_synapse/admin/v1/register"))["nonce"]
        mac = hmac.new(self.hs.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"notadmin"]))
        reply = await self.call(
            "POST",
            "/_synapse/admin/v1/register",
            {"nonce": nonce, "username": localpart, "password": password, "admin": False, "mac": mac.hexdigest()},
        )
        return User(reply["user_id"], reply["access_token"])

    async def create_room(
        self, creator: User, version: str, members: tuple[User, ...] = (), moderators: tuple[User, ...] = ()
    ) -> str:
        """A private room of *version* that *members* joined; *moderators* get power level 50 (may redact)."""
        powers = {m.user_id: 50 for m in moderators}
        if int(version) < 12:  # from version 12 the creator's power is implicit and may not be listed
            powers[creator.user_id] = 100
        reply = await self.call(
            "POST",
            "/_matrix/client/v3/createRoom",
            {
                "room_version": version,
                "preset": "private_chat",
                "invite": [m.user_id for m in members],
                "power_level_content_override": {"users": powers},
            },
            creator.token,
        )
        room_id: str = reply["room_id"]
        for member in members:
            await self.call("POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/join", {}, member.token)
        return room_id

    async def send(self, user: User, room_id: str, text: str) -> str:
        reply = await self.call(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/{uuid.uuid4().hex}",
            {"msgtype": "m.text", "body": text},
            user.token,
        )
        event_id: str = reply["event_id"]
        return event_id

    async def redact(self, user: User, room_id: str, event_id: str, reason: str | None = None) -> str:
        reply = await self.call(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/redact/{quote(event_id)}/{uuid.uuid4().hex}",
            {} if reason is None else {"reason": reason},
            user.token,
        )
        redaction_id: str = reply["event_id"]
        return redaction_id

    async def event(self, user: User, room_id: str, event_id: str) -> dict[str, Any]:
        found: dict[str, Any] = await self.call(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/event/{quote(event_id)}", token=user.token
        )
        return found

    async def ping(self) -> None:
        """Ask the homeserver to ping the relay as the application service (and, with Synapse,
        to retry at once whatever it holds for it)."""
        await self.call("POST", f"/_matrix/client/v1/appservice/{AS_ID}/ping", {}, self.hs.as_token)


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll *predicate* (sync or async) every 50 ms until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
