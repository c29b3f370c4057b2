"""The chaos run's report: bench/results/chaos-<date>.md (counts, violations, the schedule as run) and a
PNG timeline — one row of bars per fault target, then answers per second, spool depth and latency —
drawn with matplotlib when it is installed (the ``bench`` extra), skipped with a message otherwise."""

from __future__ import annotations

import platform
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tests.faults.chaos_check import Verdict

if TYPE_CHECKING:
    from tests.faults.chaos import Chaos

TARGETS = ("n0", "n1", "n2", "r0", "r1", "redis", "tencent")


def write_report(chaos: Chaos, verdict: Verdict, out_dir: Path, *, tmpfs: bool, wall: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    md = out_dir / f"chaos-{stamp}.md"
    png = md.with_suffix(".png")
    drawn = draw_timeline(chaos, png)
    p = chaos.profile
    lines = [
        f"# Chaos run, seed {chaos.plan.seed}: {'PASS' if verdict.passed else 'FAIL'}",
        "",
        f"`python -m tests.faults.chaos --duration {p.duration:g}s --seed {chaos.plan.seed} --rate {p.rate:g}` "
        f"on {platform.platform()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min.",
        f"Load: {p.rate:g} recall callbacks/s, {p.send_rate:g} after-send callbacks/s, {p.gateway_rate:g} gateway "
        f"requests/s over two relays; a fault every {p.mean_gap:g} s on average, 1–40 s each. Spools "
        + ("on a 48 MiB tmpfs each." if tmpfs else "on the work disk (no tmpfs: spool_full not injected)."),
        "",
        "| count | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in verdict.counts.items()),
        "",
        "## Violations",
        "",
        *([f"- {v}" for v in verdict.violations] or ["none"]),
        "",
        "## The schedule as run",
        "",
        "Planned start and length from the seed; the actual start and end (run seconds) and what happened. "
        "A fault starts late when an earlier one on the same target or group was still recovering.",
        "",
        "| planned s | length s | fault | started s | ended s | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(chaos.as_run, key=lambda r: r.fault.start):
        start = f"{r.start:.1f}" if r.start is not None else "—"
        end = f"{r.end:.1f}" if r.end is not None else "—"
        lines.append(f"| {r.fault.start:.1f} | {r.fault.length:.1f} | {r.fault.label()} | {start} | {end} | {r.note} |")
    lines += ["", f"![timeline]({png.name})" if drawn else "(no timeline: matplotlib is not installed)", ""]
    md.write_text("\n".join(lines))
    print(f"report written to {md}" + (f" and {png}" if drawn else ""), flush=True)
    return md


def draw_timeline(chaos: Chaos, path: Path) -> bool:
    """The PNG; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no timeline PNG", flush=True)
        return False
    seconds = int(chaos.profile.duration) + 1
    ok, refused, unanswered = [0] * seconds, [0] * seconds, [0] * seconds
    worst = [0.0] * seconds
    for r in chaos.requests:
        s = int(r.start)
        if r.kind != "recall" or not 0 <= s < seconds:
            continue
        if r.status == 200:
            ok[s] += 1
        elif r.status is None:
            unanswered[s] += 1
        else:
            refused[s] += 1
        worst[s] = max(worst[s], r.end - r.start)
    fig, axes = plt.subplots(4, 1, figsize=(14, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1.2, 1.2]})
    bars, answers, spool, latency = axes
    colors = plt.get_cmap("tab20")
    kinds = sorted({r.fault.kind for r in chaos.as_run})
    for r in chaos.as_run:
        if r.start is None or r.end is None:
            continue
        row = TARGETS.index(r.fault.target)
        bars.broken_barh(
            [(r.start, r.end - r.start)], (row - 0.4, 0.8), color=colors(kinds.index(r.fault.kind)), alpha=0.8
        )
    bars.set_yticks(range(len(TARGETS)), TARGETS)
    bars.invert_yaxis()
    bars.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=colors(i)) for i in range(len(kinds))],
        labels=kinds,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
    bars.set_title(f"chaos seed {chaos.plan.seed}: faults, and the recall callbacks under them")
    xs = list(range(seconds))
    # Stacked: every second's callbacks split by answer (the rate is steady, so gaps are the story).
    answers.stackplot(
        xs,
        ok,
        refused,
        unanswered,
        labels=["200/s", "503/s (documented)", "unanswered/s (relay down)"],
        colors=["tab:green", "tab:orange", "tab:red"],
    )
    answers.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    by_relay: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for t, relay, events in chaos.samples:
        by_relay[relay].append((t, events))
    for relay, points in sorted(by_relay.items()):
        spool.plot([t for t, _ in points], [e for _, e in points], label=f"r{relay} spool", linewidth=0.8)
    spool.set_ylabel("events")
    spool.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    latency.plot(xs, worst, color="tab:purple", linewidth=0.8)
    latency.set_ylabel("max s")
    latency.set_xlabel("seconds since the load began")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
