"""Synthetic recall callbacks, shaped as Tencent documents them; used by ``relay send-sample``,
the tests, the benchmark and the fault harness. Every call makes a fresh message key."""

from __future__ import annotations

import itertools
import os
import time
from urllib.parse import urlencode

import orjson

from relay.tencent.auth import sign
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL

KINDS = {"c2c": C2C_RECALL, "group": GROUP_RECALL, "official_account": OFFICIAL_ACCOUNT_RECALL}
_counter = itertools.count(1)


def _unique() -> int:
    # Process id + counter + time: distinct across calls and concurrent processes.
    return (int(time.time() * 1000) % 10**10) * 10**6 + (os.getpid() % 1000) * 1000 + next(_counter) % 1000


def sample_body(kind: str, n: int | None = None, *, items: int = 1) -> dict[str, object]:
    """A recall callback body of *kind* (``c2c``, ``group``, ``official_account``)."""
    n = _unique() if n is None else n
    now_ms = int(time.time() * 1000)
    if kind == "c2c":
        return {
            "CallbackCommand": C2C_RECALL,
            "From_Account": "u_alice",
            "To_Account": "u_bob",
            "MsgKey": f"{n % 10**6}_{n}_{now_ms // 1000}",
            "UnreadMsgNum": 3,
            "EventTime": now_ms,
        }
    if kind == "group":
        return {
            "CallbackCommand": GROUP_RECALL,
            "Operator_Account": "u_mod01",
            "Type": "Public",
            "GroupId": "@TGS#2SAMPLE01",
            "MsgSeqList": [
                {"MsgSeq": n * 10 + i, "MsgId": f"144115200000000001-{now_ms // 1000}-{n + i}"} for i in range(items)
            ],
            "EventTime": str(now_ms),
        }
    if kind == "official_account":
        return {
            "CallbackCommand": OFFICIAL_ACCOUNT_RECALL,
            "Official_Account": "@TOA#_news01",
            "WithdrawMsgList": [{"MsgKey": f"77_{n}_{now_ms // 1000}_{i}"} for i in range(items)],
            "EventTime": now_ms,
        }
    raise ValueError(f"unknown sample kind {kind!r}; expected one of {', '.join(KINDS)}")


def callback_query(
    command: str,
    sdk_app_id: str,
    token: str | None = None,
    *,
    request_time: int | None = None,
    platform: str = "Android",
    client_ip: str = "198.51.100.7",
) -> str:
    """The query string Tencent appends to the callback URL, signed when *token* is given."""
    params = {
        "SdkAppid": sdk_app_id,
        "CallbackCommand": command,
        "contenttype": "json",
        "ClientIP": client_ip,
        "OptPlatform": platform,
    }
    if token is not None:
        rt = str(int(time.time()) if request_time is None else request_time)
        params["Sign"] = sign(token, rt)
        params["RequestTime"] = rt
    return urlencode(params)


def encode(body: dict[str, object]) -> bytes:
    return orjson.dumps(body)
