"""The HTTP load generator: wrk with bench/wrk/callback.lua (distinct, signed recall callbacks)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import callback_query, encode, sample_body
from relay.tencent.sends import C2C_SEND

LUA = Path(__file__).parent / "wrk" / "callback.lua"
CALLBACK_PATH = "/tencent-im/callback"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return "missing"
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    first = (out.stdout + out.stderr).splitlines()[0]
    return first.split(" Copyright")[0].strip()


def body_template(command: str = C2C_RECALL) -> str:
    """A C2C recall (or, for C2C_SEND, an after-send) body with placeholders for MsgKey and EventTime."""
    body = sample_body("c2c", n=1)
    if command == C2C_SEND:
        body.update(
            CallbackCommand=C2C_SEND,
            MsgSeq=48374,
            MsgRandom=2837546,
            MsgTime=1767225540,
            MsgId="144115212345678901-1767225540-2837546",
            SendMsgResult=0,
            MsgBody=[{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hello there"}}],
            CloudCustomData="",
        )
    body["MsgKey"] = "@@KEY@@"
    body["EventTime"] = 999_999_999_999_999
    text = encode(body).decode()
    return text.replace('"@@KEY@@"', '"{KEY}"').replace("999999999999999", "{MS}")


@dataclass(frozen=True)
class Target:
    """Where and how to send callbacks: app id, optional token (signed), and for how long."""

    port: int
    app: str
    token: str | None
    command: str = C2C_RECALL


def write_paths(target: Target, seconds: float, directory: Path) -> Path:
    """One callback path per second of the run; each Sign precomputed for its RequestTime."""
    path = directory / "paths.tsv"
    now = int(time.time())
    lines = []
    if target.token is None:
        lines.append(f"0\t{CALLBACK_PATH}?{callback_query(target.command, target.app)}")
    else:
        for second in range(now - 2, now + int(seconds) + 30):
            query = callback_query(target.command, target.app, target.token, request_time=second)
            lines.append(f"{second}\t{CALLBACK_PATH}?{query}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(
    target: Target, connections: int, seconds: float, *, threads: int = 1, timeout: float = 10.0
) -> dict[str, Any]:
    """Run wrk once; return its BENCH_JSON summary plus the wrk process's own CPU seconds.

    The caller snapshots CPU around this call; wrk's CPU comes from wait4's rusage because wrk
    has exited (and left /proc) by the time the closing snapshot is taken.
    """
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed: run bench/ensure-tools.sh")
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        tmpdir = Path(tmp)
        paths = write_paths(target, seconds, tmpdir)
        env = {
            **os.environ,
            "BENCH_PATH_FILE": str(paths),
            "BENCH_BODY": body_template(target.command),
            "BENCH_RUN": f"{random.randrange(10**6):06d}",
        }
        args = [
            wrk,
            f"-t{max(1, min(threads, connections))}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout:g}s",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{target.port}{CALLBACK_PATH}",
        ]
        out_path, err_path = tmpdir / "stdout", tmpdir / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(args, stdout=out, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = out_path.read_text(), err_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {stderr.strip() or stdout.strip()}")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no BENCH_JSON line:\n{stdout}\n{stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    result["wrk_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["threads"] = max(1, min(threads, connections))
    if stderr.strip():
        result["stderr"] = stderr.strip()[:500]
    return result
