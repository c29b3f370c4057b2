"""The markdown rendering of one benchmark result (bench/results/*.md)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# Extra columns (heading, row key) of the relay and spool sections.
_RELAY_COLUMNS = (
    ["200s", "queued", "queue ≥ 200s", "distinct eventIDs read back", "spooled"],
    ["ok", "queued", "queue_check", "distinct_ids", "spooled"],
)
_SPOOL_COLUMNS = (["200s", "spooled", "spooled ≥ 200s"], ["ok", "spooled", "spool_check"])


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def _others(row: dict[str, Any]) -> str:
    cpu = row.get("cpu") or {}
    return f"{_fmt(cpu.get('others_pct_of_machine'))} %"


def _statuses(row: dict[str, Any]) -> str:
    bad = {**row.get("non_200", {}), **row.get("socket_errors", {})}
    return ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "0"


def _http_rows(section: dict[str, Any], extra: list[str]) -> list[list[Any]]:
    rows = []
    for r in section.get("rows", []):
        lat = r["latency_ms"]
        row: list[Any] = [
            r["connections"],
            r["ok_rps"],
            lat["p50"],
            lat["p99"],
            r["server_cpu_us_per_req"],
            r["broker_cpu_us_per_req"],
            f"{_fmt(r['rss_mib_max'])} / {_fmt(r['rss_mib_end'])}",
            _statuses(r),
        ]
        for key in extra:
            row.append(r.get(key))
        row.append(_others(r))
        rows.append(row)
    return rows


_HTTP_HEADER = [
    "connections",
    "200/s",
    "p50 ms",
    "p99 ms",
    "server CPU µs/req",
    "broker CPU µs/req",
    "RSS MiB max / end",
    "non-200 / errors",
]


def _section_problem(section: dict[str, Any] | None) -> str | None:
    if section is None:
        return "not run"
    if "error" in section:
        return f"**harness error**: `{section['error'][:300]}`"
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    return None


def markdown(result: dict[str, Any]) -> str:
    m, v, c = result["machine"], result["versions"], result["config"]
    title = "revoke-relay benchmark" + (" (smoke run: seconds-long, numbers meaningless)" if result["smoke"] else "")
    out = [
        f"# {title}",
        "",
        f"{result['when']} · {m['nproc']} × {m['cpu_model']} · {m['kernel']} · "
        f"load average {m['loadavg_start'].split()[0]} → {m.get('loadavg_end', '?').split()[0]}",
        "",
        f"Python {v['python']}, aiohttp {v['aiohttp']}, aio-pika {v['aio-pika']}, aiormq {v['aiormq']}, "
        f"pamqp {v['pamqp']}, uvloop {v['uvloop']}; {v['rabbitmq']} ({c['amqp']}, PID {c['broker_pid']}); "
        f"{v['wrk']}; relay: {result['git'].get('measured', 'working tree')} at {result['git']['commit']}"
        f"{' with uncommitted changes in relay/' if result['git']['dirty'] else ''}.",
        "",
        f"Each run: {c['warmup_s']:g} s warm-up, then {c['duration_s']:g} s measured; wrk with {c['wrk_threads']} "
        f"thread(s) and bench/wrk/callback.lua (every request a distinct C2C recall"
        f"{', signed: Sign = sha256(token + RequestTime) checked by the relay' if c['signed'] else ', unsigned app'}). "
        "Relay, broker and wrk share the machine's cores; compare the ratios of one run, not absolute "
        "numbers across runs.",
        "",
        "## Ratios",
        "",
    ]
    ratios = result["ratios"]
    best = ratios["best"]
    out += _table(
        ["connections", "A 200/s", "R 200/s", "R/A", "R/B", "R/RH", "S 200/s", "S/A"],
        [
            [
                p["connections"],
                _lookup(result, "A", p["connections"]),
                _lookup(result, "R", p["connections"]),
                _ratio(p["R/A"]),
                _ratio(p["R/B"]),
                _ratio(p.get("R/RH")),
                _lookup(result, "S", p["connections"]),
                _ratio(p["S/A"]),
            ]
            for p in ratios["per_connections"]
        ]
        + [
            [
                "best of each",
                f"{_fmt(best['A']['ok_rps'])} (c={best['A']['connections']})",
                f"{_fmt(best['R']['ok_rps'])} (c={best['R']['connections']})",
                _ratio(best["R/A"]),
                _ratio(best["R/B"]),
                "",
                f"{_fmt(best['S']['ok_rps'])} (c={best['S']['connections']})",
                _ratio(best["S/A"]),
            ]
        ],
    )
    out += [
        "",
        f"B (broker ceiling, best client) = {_fmt(best['B_msgs_per_s'])} confirmed msg/s. One event per C2C "
        "callback, so R/B compares callbacks/s with confirmed publishes/s. R/RH: the relay with its HTTP fast "
        "path against the same relay with `RELAY_HTTP_FAST_PATH=off` (aiohttp answers every callback).",
        "",
        "## A — HTTP ceiling: bare aiohttp handler, same reply",
        "",
    ]
    out += _http_section(result.get("A"), [], [])
    out += ["", "## B — broker ceiling: confirmed persistent publishes of relay events to a quorum queue", ""]
    out += _broker_section(result.get("B"))
    out += ["", "## R — relay end to end: signed callbacks, each 200 backed by a broker confirm", ""]
    out += _http_section(result.get("R"), *_RELAY_COLUMNS)
    if "RH" in result:
        out += ["", "## RH — the relay with `RELAY_HTTP_FAST_PATH=off`: aiohttp answers every callback", ""]
        out += _http_section(result.get("RH"), *_RELAY_COLUMNS)
    out += ["", "## S — spool path: broker unreachable, each 200 a durable (fsync'd) SQLite write", ""]
    out += _http_section(result.get("S"), *_SPOOL_COLUMNS)
    if "RW" in result:
        workers = (result["RW"] or {}).get("workers", c["workers"])
        out += ["", f"## RW — relay with {workers} worker processes", ""]
        out += _http_section(
            result.get("RW"), ["200s", "queued", "queue ≥ 200s"], ["ok", "queued", "queue_check"], server="relay tree"
        )
    if "SW" in result:
        workers = (result["SW"] or {}).get("workers", c["workers"])
        out += ["", f"## SW — spool path with {workers} worker processes (one spool each)", ""]
        out += _http_section(result.get("SW"), *_SPOOL_COLUMNS, server="relay tree")
        sw = [f"c={p['connections']}: {_ratio(p.get('SW/A'))}" for p in result["ratios"]["per_connections"]]
        out += ["", f"SW/A: {', '.join(sw)}."]
    if "W" in result:
        out += ["", "## W — after-send callbacks recorded for enrichment: embedded store vs Redis", ""]
        out += _sends_section(result.get("W"))
    out += ["", "## What else used the CPU", ""]
    out += _cpu_section(result)
    failures, errors = result.get("checks_failed", []), result.get("errors", [])
    out += ["", "## Checks", ""]
    if not failures and not errors:
        out.append("Every R run's queue held at least as many events as 200s; every S run spooled at least as many.")
    out += [f"- check failed: {f}" for f in failures] + [f"- harness error in {e}" for e in errors]
    out.append("")
    return "\n".join(out)


def _sends_section(section: dict[str, Any] | None) -> list[str]:
    problem = _section_problem(section)
    if problem or section is None:
        return [problem or "not run"]
    rows = [
        [
            r["store"],
            r["connections"],
            _fmt(r["ok_rps"]),
            _fmt(r["latency_ms"].get("p50"), 2),
            _fmt(r["latency_ms"].get("p99"), 2),
            _fmt(r["server_cpu_us_per_req"]),
            _fmt(r["rss_mib_max"]),
            r["records_written"],
            r["records_dropped"],
        ]
        for r in section["rows"]
    ]
    header = [
        "store",
        "connections",
        "200/s",
        "p50 ms",
        "p99 ms",
        "relay CPU µs/req",
        "RSS MiB max",
        "records written",
        "dropped",
    ]
    return _table(header, rows)


def _lookup(result: dict[str, Any], key: str, connections: int) -> str:
    for r in (result.get(key) or {}).get("rows", []):
        if r["connections"] == connections:
            return _fmt(r["ok_rps"])
    return "–"


def _http_section(section: dict[str, Any] | None, header: list[str], keys: list[str], server: str = "") -> list[str]:
    problem = _section_problem(section)
    if problem or section is None:
        return [problem or "not run"]
    head = list(_HTTP_HEADER)
    if server:
        head[4] = f"{server} CPU µs/req"
    return _table([*head, *header, "other CPU users"], _http_rows(section, keys))


def _broker_section(section: dict[str, Any] | None) -> list[str]:
    problem = _section_problem(section)
    if problem or section is None:
        return [problem or "not run"]
    rows = [
        [
            r["variant"],
            r["window"],
            r["msgs_per_s"],
            r["client_cpu_us_per_msg"],
            r["broker_cpu_us_per_msg"],
            _latency(r.get("confirm_latency_ms")),
            r["confirmed"],
            r["queued"],
            r["queue_check"],
            _others(r),
        ]
        for r in section["rows"]
    ]
    first = section["rows"][0] if section["rows"] else {}
    lines = _table(
        [
            "client",
            "in flight",
            "confirmed msg/s",
            "client CPU µs/msg",
            "broker CPU µs/msg",
            "confirm p50 / p99 ms",
            "confirmed",
            "queued",
            "queue ≥ confirmed",
            "other CPU users",
        ],
        rows,
    )
    best = section["best"]
    lines += [
        "",
        f"Best: **{best['variant']}** with {best['window']} in flight, {_fmt(best['msgs_per_s'])} msg/s. Messages: "
        f"{first.get('body_bytes')} B body, {first.get('frames_bytes')} B on the wire with properties and "
        "CloudEvents headers, persistent, mandatory, to a topic exchange bound to one quorum queue. "
        "`raw` = asyncio protocol + pamqp-encoded frames, pipelined, acks by delivery tag (`multiple`). "
        "Confirm latency (raw only) is publish-to-confirm as the client sees it: with 16 in flight it is the "
        "broker's share of R's latency at 16 connections.",
    ]
    return lines


def _latency(value: dict[str, float] | None) -> str:
    return f"{value['p50']} / {value['p99']}" if value else "–"


def _cpu_section(result: dict[str, Any]) -> list[str]:
    rows = []
    for key in ("A", "B", "R", "RH", "S", "RW", "SW", "W"):
        section = result.get(key) or {}
        for r in section.get("rows", []):
            cpu = r.get("cpu") or {}
            name = f"{key} c={r['connections']}" if "connections" in r else f"{key} {r['variant']}/{r['window']}"
            if "store" in r:
                name = f"{key} {r['store']} c={r['connections']}"
            top = ", ".join(f"{t['comm']} {t['cpu_s']:.2f}s" for t in cpu.get("top_others", [])[:3])
            used = ", ".join(f"{k} {val:.2f}s" for k, val in cpu.get("cpu_s", {}).items())
            rows.append(
                [
                    name,
                    f"{_fmt(cpu.get('machine_busy_pct'))} %",
                    used,
                    f"{_fmt(cpu.get('others_pct_of_machine'))} %",
                    f"{_fmt(cpu.get('steal_pct'))} %",
                    top or "–",
                ]
            )
    lines = _table(["run", "machine busy", "CPU by role", "others", "steal", "top other processes"], rows)
    whole = (result.get("other_cpu_users") or {}).get("whole_run") or {}
    top = ", ".join(f"{t['comm']} (PID {t['pid']}) {t['cpu_s']:.1f}s" for t in whole.get("top_others", []))
    lines += [
        "",
        f"Whole run ({_fmt(whole.get('window_s'))} s): machine {_fmt(whole.get('machine_busy_pct'))} % busy, "
        f"steal {_fmt(whole.get('steal_pct'))} %; longest-lived other CPU users: {top or '–'}. "
        '"others" = machine busy time minus the run\'s roles (server, broker, wrk, harness): other '
        "engineers' jobs, kernel threads, short-lived processes.",
    ]
    return lines
