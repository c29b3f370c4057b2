"""Issue 5's benchmark: one run measures, on the same machine and broker, back to back,

* **A** the HTTP ceiling: a bare aiohttp handler returning the relay's exact OK reply;
* **B** the broker ceiling: confirmed persistent publishes of relay events, fastest client we have;
* **R** the relay end to end: distinct signed recall callbacks, every 200 backed by a confirm;
* **S** the spool path: the same with the broker unreachable, every 200 a durable spool write;
* **RW** (optional) R against ``relay serve --workers N`` once that mode exists;

at each connection count: throughput, p50/p99 latency, CPU per request of server and broker, the
server's RSS, and what else used the CPU. After every R run the queue must hold at least as many
events as there were 200s (after every S run, the spool): that, and harness errors, are the only
ways this exits non-zero. No speed is asserted.

    bench/ensure-tools.sh && .venv/bin/python -m bench.run
    .venv/bin/python -m bench.run --smoke --out /tmp/bench     # seconds-long, for CI

Writes ``<out>/<UTC timestamp>.json`` and ``.md`` and overwrites ``<out>/latest.json`` and
``latest.md`` (``-smoke`` / ``latest-smoke`` for smoke runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.load import Target, run_wrk, wrk_path, wrk_version
from bench.report import markdown
from bench.services import BareHttp, Relay, Service, amqp_url, rabbitmq_version, relay_supports_workers
from relay.tencent.callback import C2C_RECALL
from relay.tencent.sends import C2C_SEND

ROOT = Path(__file__).resolve().parents[1]
APP = "1400000001"
TOKEN = "bench-callback-token"  # the relay verifies Sign = sha256(token + RequestTime) on every callback
MEASUREMENTS = ("A", "B", "R", "RH", "S", "RW", "SW", "W")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Config:
    connections: list[int]
    duration: float
    warmup: float
    threads: int
    broker_runs: list[tuple[str, int]]  # (client variant, publishes in flight)
    workers: int
    signed: bool
    verify_ids: bool
    smoke: bool
    out: Path
    only: set[str]
    relay_src: Path = ROOT  # where the relay package under test lives
    relay_rev: str | None = None


@dataclass
class Context:
    """What every measurement shares: the broker's PID, CPU count, and failed checks so far."""

    broker_pid: int | None
    ncpu: int
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            print(f"  CHECK FAILED: {what}", flush=True)
        return ok


# -- one HTTP load run against a started service -----------------------------------------------------


def http_run(
    cfg: Config, ctx: Context, service: Service, connections: int, command: str = C2C_RECALL
) -> dict[str, Any]:
    """Warm up, then one measured wrk run: latency, throughput, CPU per request, RSS."""
    target = Target(service.port, APP, TOKEN if cfg.signed else None, command)
    if cfg.warmup > 0:
        run_wrk(target, connections, cfg.warmup, threads=cfg.threads)
    pre = pre_window(service)
    server_pids = service.pids()
    before = procstat.Snapshot.take()
    with procstat.RssSampler(service.pid) as rss:
        wrk = run_wrk(target, connections, cfg.duration, threads=cfg.threads)
    after = procstat.Snapshot.take()
    roles = {"server": server_pids, "broker": [ctx.broker_pid] if ctx.broker_pid else [], "harness": [os.getpid()]}
    window = procstat.cpu_window(before, after, roles, extra={"wrk": wrk["wrk_cpu_s"]})
    seconds = wrk["duration_us"] / 1e6
    requests = wrk["requests"]
    lat = wrk["latency_us"]

    def per_request(role: str) -> float | None:
        return round(1e6 * window.roles[role] / requests, 1) if requests else None

    row: dict[str, Any] = {
        "connections": connections,
        "seconds": round(seconds, 2),
        "requests": requests,
        "ok": wrk["ok"],
        "non_200": {k: v for k, v in wrk["statuses"].items() if k != "200"},
        "socket_errors": {k: v for k, v in wrk["errors"].items() if v and k != "status"},
        "rps": round(requests / seconds, 1) if seconds else 0.0,
        "ok_rps": round(wrk["ok"] / seconds, 1) if seconds else 0.0,
        "latency_ms": {k: round(v / 1000, 2) for k, v in lat.items()},
        "server_cpu_us_per_req": per_request("server"),
        "broker_cpu_us_per_req": per_request("broker") if ctx.broker_pid else None,
        "wrk_cpu_us_per_req": per_request("wrk"),
        "rss_mib_max": round(rss.max, 1),
        "rss_mib_end": round(rss.last, 1),
        "wrk_threads": wrk["threads"],
        "cpu": window.as_dict(ctx.ncpu),
        **pre,
    }
    return row


def pre_window(service: Service) -> dict[str, Any]:
    """For a relay: settle the warm-up (nothing in flight), then its counters and queue depth."""
    if not isinstance(service, Relay):
        return {}
    service.wait_idle()
    metrics = service.metrics()
    queued = 0 if service.spool_only else service.queue_count(at_least=int(metrics["published"]), settle=15)
    return {"_metrics_before": metrics, "_queued_before": queued}


def relay_checks(ctx: Context, relay: Relay, row: dict[str, Any], label: str, *, verify_ids: bool = False) -> None:
    """After the run: every 200 is in the queue (R) or in the spool (S); R spooled nothing."""
    relay.wait_idle()
    before: dict[str, float] = row.pop("_metrics_before")
    queued_before: int = row.pop("_queued_before")
    after = relay.metrics()
    delta = {k: int(after[k] - before[k]) for k in ("accepted", "spooled", "published", "publish_failures")}
    row["relay_counters"] = delta
    row["spooled"] = delta["spooled"]
    ok = row["ok"]
    if relay.workers > 1:
        row["note"] = "relay counters come from whichever worker answered /metrics"
    if relay.spool_only:
        row["spool_events"] = int(after["spool_events"])
        row["spool_check"] = ctx.check(
            delta["spooled"] >= ok or (relay.workers > 1 and row["spool_events"] >= ok),
            f"{label} c={row['connections']}: spooled {delta['spooled']} < {ok} 200s",
        )
        return
    queued = relay.queue_count(at_least=queued_before + ok) - queued_before
    row["queued"] = queued
    row["queue_check"] = ctx.check(queued >= ok, f"{label} c={row['connections']}: queue holds {queued} < {ok} 200s")
    if verify_ids:
        # wrk's script must make every request a distinct recall: read the queue back and count eventIDs.
        read, distinct = relay.distinct_event_ids(queued_before + queued)
        row["read_back"] = {"messages": read, "distinct_event_ids": distinct}
        row["distinct_ids"] = distinct
        ctx.check(
            distinct == read and read >= queued_before + ok,
            f"{label} c={row['connections']}: read back {read} messages with {distinct} distinct eventIDs",
        )
    if delta["spooled"]:
        print(f"  note: {delta['spooled']} events were spooled during {label} (broker slow or unavailable)")


# -- the measurements: one function each -------------------------------------------------------------


def measure_bare_http(cfg: Config, ctx: Context) -> dict[str, Any]:
    """A: the HTTP ceiling — a bare aiohttp app, same wrk script and connections."""
    rows = []
    for connections in cfg.connections:
        with BareHttp() as server:
            rows.append(http_run(cfg, ctx, server, connections))
        progress("A", rows[-1])
    return {"what": "bare aiohttp handler returning the relay's OK reply", "rows": rows}


def measure_broker_ceiling(cfg: Config, ctx: Context) -> dict[str, Any]:
    """B: the broker ceiling — each client variant in its own process, best msg/s wins."""
    rows = []
    seconds = cfg.duration
    warmup = max(0.5, min(2.0, cfg.warmup))
    for variant, window in cfg.broker_runs:
        cmd = [sys.executable, "-m", "bench.broker_ceiling", "--variant", variant, "--window", str(window)]
        cmd += ["--seconds", str(seconds), "--warmup", str(warmup), "--url", amqp_url()]
        if ctx.broker_pid:
            cmd += ["--broker-pid", str(ctx.broker_pid)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 180, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"broker ceiling {variant}/{window} exited {out.returncode}:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        ctx.check(
            row["queue_check"], f"B {variant}/{window}: queue holds {row['queued']} < {row['confirmed']} confirms"
        )
        rows.append(row)
        progress("B", row)
    best = max(rows, key=lambda r: r["msgs_per_s"])
    return {
        "what": "confirmed persistent mandatory publishes of relay events to a quorum queue",
        "rows": rows,
        "best": {"variant": best["variant"], "window": best["window"], "msgs_per_s": best["msgs_per_s"]},
    }


def measure_relay(
    cfg: Config, ctx: Context, *, workers: int = 1, label: str = "R", env: dict[str, str] | None = None
) -> dict[str, Any]:
    """R: the relay end to end, each 200 a broker confirm; queue checked after every run."""
    rows = []
    for connections in cfg.connections:
        with Relay(APP, TOKEN if cfg.signed else None, workers=workers, src=cfg.relay_src, extra_env=env) as relay:
            row = http_run(cfg, ctx, relay, connections)
            relay_checks(ctx, relay, row, label, verify_ids=cfg.verify_ids)
        rows.append(row)
        progress(label, row)
    return {
        "what": f"relay serve{f' --workers {workers}' if workers > 1 else ''}: signed C2C recalls, confirms",
        "workers": workers,
        "rows": rows,
    }


def measure_relay_aiohttp(cfg: Config, ctx: Context) -> dict[str, Any]:
    """RH: R with RELAY_HTTP_FAST_PATH=off, aiohttp answering every callback (what the fast path saves)."""
    result = measure_relay(cfg, ctx, label="RH", env={"RELAY_HTTP_FAST_PATH": "off"})
    result["what"] += "; RELAY_HTTP_FAST_PATH=off"
    return result


def measure_spool(cfg: Config, ctx: Context, *, workers: int = 1, label: str = "S") -> dict[str, Any]:
    """S: the spool path — broker unreachable, so every 200 is a durable (fsync'd) spool write."""
    rows = []
    for connections in cfg.connections:
        with Relay(APP, TOKEN if cfg.signed else None, spool_only=True, workers=workers, src=cfg.relay_src) as relay:
            row = http_run(cfg, ctx, relay, connections)
            relay_checks(ctx, relay, row, label)
        rows.append(row)
        progress(label, row)
    what = "relay with RELAY_AMQP_URL on a closed port: every event spooled (SQLite, fsync)"
    return {"what": what + (f"; --workers {workers}" if workers > 1 else ""), "workers": workers, "rows": rows}


def measure_spool_workers(cfg: Config, ctx: Context) -> dict[str, Any]:
    """SW: S against N relay processes (``relay serve --workers N``), one spool each."""
    return measure_spool(cfg, ctx, workers=cfg.workers, label="SW")


def measure_relay_workers(cfg: Config, ctx: Context) -> dict[str, Any]:
    """RW: R against N relay processes (``relay serve --workers N``), skipped until that exists."""
    if not relay_supports_workers(cfg.relay_src):
        return {"skipped": f"relay serve has no --workers option yet (asked for {cfg.workers})"}
    return measure_relay(cfg, ctx, workers=cfg.workers, label="RW")


def measure_sends(cfg: Config, ctx: Context) -> dict[str, Any]:
    """W: after-send callbacks (the enrichment hot path), embedded store vs Redis, same load."""
    rows = []
    for store, env in (("embedded", {}), ("redis", {"RELAY_REDIS_URL": REDIS_URL})):
        for connections in cfg.connections:
            with Relay(APP, TOKEN if cfg.signed else None, src=cfg.relay_src, extra_env=env) as relay:
                row = http_run(cfg, ctx, relay, connections, command=C2C_SEND)
                row.pop("_queued_before", None)
                before = row.pop("_metrics_before")
                relay.wait_idle()
                deadline = time.monotonic() + 10  # Redis writes are batched in the background
                while True:
                    after = relay.metrics()
                    written = int(after["correlation_writes"] - before["correlation_writes"])
                    if written >= row["ok"] or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                row["store"] = store
                row["records_written"] = written
                row["records_dropped"] = int(after["correlation_dropped"] - before["correlation_dropped"])
                ctx.check(written >= row["ok"], f"W {store} c={connections}: {written} records for {row['ok']} 200s")
            rows.append(row)
            progress(f"W {store}", row)
    return {"what": "C2C.CallbackAfterSendMsg callbacks recorded for enrichment", "rows": rows}


# -- orchestration -----------------------------------------------------------------------------------


def progress(label: str, row: dict[str, Any]) -> None:
    if "msgs_per_s" in row:
        print(f"  {label} {row['variant']:>8} window {row['window']:>5}: {row['msgs_per_s']:>9.1f} msg/s", flush=True)
        return
    lat = row["latency_ms"]
    print(
        f"  {label} c={row['connections']:<4} {row['ok_rps']:>9.1f} 200/s  p50 {lat['p50']:.2f} ms  "
        f"p99 {lat['p99']:.2f} ms  server {row['server_cpu_us_per_req']} µs/req",
        flush=True,
    )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("aiohttp", "aio-pika", "aiormq", "pamqp", "uvloop", "orjson", "revoke-relay"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    out["rabbitmq"] = rabbitmq_version()
    out["wrk"] = wrk_version()
    return out


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    return ""


def git_state(rev: str | None) -> dict[str, Any]:
    """Which relay was measured: the working tree (HEAD plus uncommitted changes) or a revision."""
    if rev is not None:
        return {"commit": _git("rev-parse", "--short", rev), "dirty": False, "measured": f"revision {rev}"}
    dirty = bool(_git("status", "--porcelain", "relay"))
    return {"commit": _git("rev-parse", "--short", "HEAD"), "dirty": dirty, "measured": "working tree"}


def export_revision(rev: str) -> Path:
    """``git archive`` the relay package of *rev* into a temp directory (read-only on the repository)."""
    target = Path(tempfile.mkdtemp(prefix="bench-relay-src-"))
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "relay"], cwd=ROOT, capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"bench: cannot export relay/ at {rev!r}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python ≥ 3.11.4
            tar.extractall(target, filter="data")
        else:  # our own git archive: trusted
            tar.extractall(target)
    return target


def machine() -> dict[str, Any]:
    uname = platform.uname()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": procstat.cpu_model(),
        "kernel": f"{uname.system} {uname.release}",
        "hostname": uname.node,
        "loadavg_start": procstat.loadavg(),
    }


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """R/A, R/B and S/A per connection count and at each one's best connection count."""

    def by_conn(key: str) -> dict[int, float]:
        section = results.get(key) or {}
        return {r["connections"]: r["ok_rps"] for r in section.get("rows", [])}

    a, r, s, rw, rh, sw = by_conn("A"), by_conn("R"), by_conn("S"), by_conn("RW"), by_conn("RH"), by_conn("SW")
    b = ((results.get("B") or {}).get("best") or {}).get("msgs_per_s")

    def ratio(x: float | None, y: float | None) -> float | None:
        return round(x / y, 3) if x and y else None

    per = []
    for c in sorted(set(a) | set(r) | set(s)):
        per.append(
            {
                "connections": c,
                "R/A": ratio(r.get(c), a.get(c)),
                "R/B": ratio(r.get(c), b),
                "S/A": ratio(s.get(c), a.get(c)),
                "RW/A": ratio(rw.get(c), a.get(c)) if rw else None,
                "R/RH": ratio(r.get(c), rh.get(c)) if rh else None,
                "SW/A": ratio(sw.get(c), a.get(c)) if sw else None,
            }
        )

    def best(d: dict[int, float]) -> tuple[int | None, float | None]:
        return max(d.items(), key=lambda kv: kv[1]) if d else (None, None)

    (ac, av), (rc, rv), (sc, sv) = best(a), best(r), best(s)
    return {
        "per_connections": per,
        "best": {
            "A": {"connections": ac, "ok_rps": av},
            "R": {"connections": rc, "ok_rps": rv},
            "S": {"connections": sc, "ok_rps": sv},
            "B_msgs_per_s": b,
            "R/A": ratio(rv, av),
            "R/B": ratio(rv, b),
            "S/A": ratio(sv, av),
        },
    }


def run(cfg: Config) -> int:
    started = time.time()
    broker_pid = procstat.listener_pid(5672)
    ctx = Context(broker_pid=broker_pid, ncpu=os.cpu_count() or 1)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "smoke": cfg.smoke,
        "config": {
            "connections": cfg.connections,
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "wrk_threads": cfg.threads,
            "signed": cfg.signed,
            "broker_runs": [f"{v}/{w}" for v, w in cfg.broker_runs],
            "workers": cfg.workers,
            "amqp": amqp_url().rpartition("@")[2],
            "broker_pid": broker_pid,
        },
        "machine": machine(),
        "versions": versions(),
        "git": git_state(cfg.relay_rev),
    }
    print(f"bench: {results['machine']['cpu_model']}, {ctx.ncpu} CPUs; broker PID {broker_pid}", flush=True)
    whole_before = procstat.Snapshot.take()
    steps: list[tuple[str, Callable[[Config, Context], dict[str, Any]]]] = [
        ("A", measure_bare_http),
        ("B", measure_broker_ceiling),
        ("R", measure_relay),
        ("RH", measure_relay_aiohttp),
        ("S", measure_spool),
    ]
    if cfg.workers > 1:
        steps.append(("RW", measure_relay_workers))
        steps.append(("SW", measure_spool_workers))
    if "W" in cfg.only:
        steps.append(("W", measure_sends))
    errors = []
    for key, step in steps:
        if key not in cfg.only:
            continue
        print(step.__doc__.splitlines()[0] if step.__doc__ else key, flush=True)
        try:
            results[key] = step(cfg, ctx)
        except Exception as exc:  # noqa: BLE001 - record, keep measuring, exit non-zero at the end
            traceback.print_exc()
            results[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            errors.append(key)
    whole_roles = {"harness": [os.getpid()], "broker": [broker_pid] if broker_pid else []}
    whole = procstat.cpu_window(whole_before, procstat.Snapshot.take(), whole_roles)
    results["machine"]["loadavg_end"] = procstat.loadavg()
    results["other_cpu_users"] = {
        "whole_run": whole.as_dict(ctx.ncpu),
        "note": "top_others: processes alive at both ends of the run, excluding the harness and the broker; "
        "the benchmark's own servers and wrk are short-lived and so not listed",
    }
    results["ratios"] = ratios(results)
    results["checks_failed"] = ctx.failures
    results["errors"] = errors
    results["elapsed_s"] = round(time.time() - started, 1)
    write(cfg, results)
    if errors or ctx.failures:
        print(f"bench: FAILED — errors in {errors}, checks failed: {ctx.failures}", file=sys.stderr)
        return 1
    return 0


def write(cfg: Config, results: dict[str, Any]) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.strptime(results["when"], "%Y-%m-%dT%H:%M:%SZ"))
    suffix = "-smoke" if cfg.smoke else ""
    text = markdown(results)
    blob = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    for name in (f"{stamp}{suffix}", f"latest{suffix}"):
        (cfg.out / f"{name}.json").write_text(blob)
        (cfg.out / f"{name}.md").write_text(text)
    print(text)
    print(f"bench: wrote {cfg.out / f'{stamp}{suffix}.json'} and .md (and latest{suffix}.*)")


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long run of every code path (CI)")
    parser.add_argument("--connections", default=None, help="comma-separated wrk connection counts (16,64,256)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run (15; smoke 2)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each run (3; smoke 1)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1: leaves the cores to the servers)")
    parser.add_argument(
        "--broker-runs",
        default=None,
        help="B client/window pairs (aio-pika/1024,aiormq/1024,raw/16,raw/64,raw/256,raw/1024,raw/4096; "
        "smoke: each at 256)",
    )
    parser.add_argument("--workers", type=int, default=1, help="also run R against `relay serve --workers N` (RW)")
    parser.add_argument("--unsigned", action="store_true", help="configure the app without a token (no Sign check)")
    parser.add_argument(
        "--no-verify-ids", action="store_true", help="skip reading R's queue back to check every eventID is distinct"
    )
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="measurements to run (A,B,R,RH,S,RW,SW,W)")
    parser.add_argument(
        "--relay-rev",
        default=None,
        help="measure the relay/ package of this git revision (exported with git archive) instead of the working tree",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    args = parser.parse_args(argv)
    smoke = args.smoke
    connections = args.connections or ("16" if smoke else "16,64,256")
    full_runs = "aio-pika/1024,aiormq/1024,raw/16,raw/64,raw/256,raw/1024,raw/4096"
    runs = args.broker_runs or ("aio-pika/256,aiormq/256,raw/256" if smoke else full_runs)
    broker_runs = []
    for item in runs.split(","):
        variant, _, window = item.strip().partition("/")
        broker_runs.append((variant, int(window or 1024)))
    return Config(
        connections=[int(c) for c in connections.split(",")],
        duration=args.duration if args.duration is not None else (2.0 if smoke else 15.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if smoke else 3.0),
        threads=args.threads,
        broker_runs=broker_runs,
        workers=args.workers,
        signed=not args.unsigned,
        verify_ids=not args.no_verify_ids,
        smoke=smoke,
        out=args.out,
        only={m.strip().upper() for m in args.only.split(",")},
        relay_rev=args.relay_rev,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if wrk_path() is None:
        print("bench: wrk not found; install it with bench/ensure-tools.sh (Debian package wrk)", file=sys.stderr)
        return 2
    if cfg.relay_rev is None:
        return run(cfg)
    cfg.relay_src = export_revision(cfg.relay_rev)
    try:
        return run(cfg)
    finally:
        shutil.rmtree(cfg.relay_src, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
