"""Read-only process and machine accounting from /proc: CPU time per process, RSS, system CPU.

Everything here only *reads* /proc; nothing signals or reconfigures a process it did not start.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may contain spaces or parentheses: split after the last ')'.
    close = raw.rfind(")")
    return [raw[raw.find("(") + 1 : close], *raw[close + 2 :].split()]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of *pid* (all its threads), in seconds; None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # fields[0] = comm, fields[1] = state (stat field 3) → utime is stat field 14 = fields[12].
    return (int(fields[12]) + int(fields[13])) / CLK_TCK


def comm(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[0] if fields else "?"


def ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def rss_mib(pid: int) -> float:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def all_pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def descendants(root: int) -> list[int]:
    """*root* and every process below it (for a relay that forks workers)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        parent = ppid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def system_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds by state from /proc/stat (all CPUs summed)."""
    first = (PROC / "stat").read_text().splitlines()[0].split()
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {name: int(value) / CLK_TCK for name, value in zip(names, first[1:9], strict=True)}


def busy_seconds(cpu: dict[str, float]) -> float:
    """CPU seconds spent running something (not idle, not waiting for I/O, not stolen)."""
    return cpu["user"] + cpu["nice"] + cpu["system"] + cpu["irq"] + cpu["softirq"]


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(inode)
    return inodes


def listener_pid(port: int) -> int | None:
    """PID of the process listening on TCP *port* (e.g. the shared broker's beam.smp on 5672)."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if inodes:
        for pid in all_pids():
            try:
                fds = os.listdir(PROC / str(pid) / "fd")
            except (PermissionError, FileNotFoundError, ProcessLookupError):
                continue
            for fd in fds:
                try:
                    if os.readlink(PROC / str(pid) / "fd" / fd) in inodes:
                        return pid
                except OSError:
                    continue
    # Fallback: a single beam.smp on the machine.
    out = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if len(out) == 1 else None


@dataclass
class Snapshot:
    """CPU seconds of every visible process, plus the machine's /proc/stat, at one instant."""

    at: float
    system: dict[str, float]
    procs: dict[int, tuple[str, float]]

    @classmethod
    def take(cls) -> Snapshot:
        procs: dict[int, tuple[str, float]] = {}
        for pid in all_pids():
            fields = _stat_fields(pid)
            if fields is not None:
                procs[pid] = (fields[0], (int(fields[12]) + int(fields[13])) / CLK_TCK)
        return cls(time.monotonic(), system_cpu(), procs)


@dataclass
class CpuWindow:
    """What used the CPU between two snapshots, split into the roles of a measurement."""

    seconds: float
    roles: dict[str, float]  # role -> CPU seconds (relay, broker, load generator, ...)
    busy: float  # machine-wide busy CPU seconds
    steal: float
    iowait: float
    others: float  # busy - sum(roles): other engineers' work, kernel, short-lived processes
    top_others: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self, ncpu: int) -> dict[str, object]:
        capacity = self.seconds * ncpu
        return {
            "window_s": round(self.seconds, 3),
            "cpu_s": {role: round(v, 3) for role, v in self.roles.items()},
            "machine_busy_pct": round(100 * self.busy / capacity, 1) if capacity else None,
            "others_cpu_s": round(self.others, 3),
            "others_pct_of_machine": round(100 * self.others / capacity, 1) if capacity else None,
            "steal_pct": round(100 * self.steal / capacity, 1) if capacity else None,
            "iowait_pct": round(100 * self.iowait / capacity, 1) if capacity else None,
            "top_others": self.top_others,
        }


def cpu_window(
    before: Snapshot, after: Snapshot, roles: Mapping[str, Iterable[int]], extra: Mapping[str, float] | None = None
) -> CpuWindow:
    """Attribute CPU between *before* and *after*: per role (PIDs), the rest as "others".

    *extra* adds CPU measured another way (e.g. the load generator's rusage from wait4, because it
    exits inside the window and so has no closing snapshot).
    """
    claimed: set[int] = set()
    used: dict[str, float] = {}
    for role, pids in roles.items():
        total = 0.0
        for pid in pids:
            claimed.add(pid)
            start = before.procs.get(pid, ("", 0.0))[1]
            end = after.procs.get(pid, ("", start))[1]
            total += max(0.0, end - start)
        used[role] = total
    for role, value in (extra or {}).items():
        used[role] = used.get(role, 0.0) + value
    deltas = []
    for pid, (name, end) in after.procs.items():
        if pid in claimed:
            continue
        start = before.procs.get(pid, (name, 0.0))[1] if pid in before.procs else 0.0
        delta = end - start
        if delta > 0:
            deltas.append((delta, pid, name))
    deltas.sort(reverse=True)
    sys_delta = {k: after.system[k] - before.system[k] for k in after.system}
    busy = busy_seconds(sys_delta)
    return CpuWindow(
        seconds=after.at - before.at,
        roles=used,
        busy=busy,
        steal=sys_delta["steal"],
        iowait=sys_delta["iowait"],
        others=max(0.0, busy - sum(used.values())),
        top_others=[{"pid": pid, "comm": name, "cpu_s": round(d, 3)} for d, pid, name in deltas[:5]],
    )


class RssSampler:
    """Sample the summed RSS of a process tree every *interval* seconds on a thread: max and last."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        self.samples.append(sum(rss_mib(pid) for pid in descendants(self.root)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def max(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def last(self) -> float:
        return self.samples[-1] if self.samples else 0.0


def cpu_model() -> str:
    try:
        text = (PROC / "cpuinfo").read_text()
    except FileNotFoundError:
        return "?"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "?"


def loadavg() -> str:
    return (PROC / "loadavg").read_text().strip()
