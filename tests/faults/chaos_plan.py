"""The chaos run's fault schedule (issue 22): pure, seeded, overlapping, within the deployment's limits.

Same seed and profile, same planned schedule. The limits are production's: at most one broker node
down at a time (killed, frozen or cut off all count), at most one relay down, one fault per target at a
time; a gap after a node or relay fault leaves it time to come back before the next one may start.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

NODES: Final = ("n0", "n1", "n2")
RELAYS: Final = ("r0", "r1")

# kind → (targets, group). A group allows one fault at a time across its targets ("" for none).
KINDS: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "node_kill": (NODES, "broker_down"),  # SIGKILL, restart after the fault
    "node_freeze": (NODES, "broker_down"),  # SIGSTOP, SIGCONT
    "node_partition": (NODES, "broker_down"),  # cut off from the other two (pause_minority)
    "disk_alarm": (NODES, ""),  # set_disk_free_limit past the disk
    "memory_alarm": (NODES, ""),  # vm_memory_high_watermark below use
    "relay_kill": (RELAYS, "relay_down"),  # SIGKILL under load, restart
    "relay_term": (RELAYS, "relay_down"),  # SIGTERM under load, restart
    # A relay whose spool's disk is full is half down (it refuses whatever it cannot publish): it counts
    # as down, so the other relay is never killed meanwhile.
    "spool_full": (RELAYS, "relay_down"),  # the spool's tmpfs filled up
    "redis_kill": (("redis",), ""),  # the correlation store's primary SIGKILLed, restarted empty
    "redis_freeze": (("redis",), ""),  # SIGSTOP, SIGCONT
    "tencent_slow": (("tencent",), ""),  # every answer held back past RELAY_TENCENT_TIMEOUT
    "tencent_5xx": (("tencent",), ""),  # every call answered HTTP 500/503
}
# Seconds a target needs after its fault before the next fault of its group (restart, rejoin).
RECOVERY: Final = {"broker_down": 20.0, "relay_down": 5.0, "": 2.0}


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault: *kind* on *target* from *start* for *length* seconds (run-relative)."""

    start: float
    length: float
    kind: str
    target: str

    @property
    def end(self) -> float:
        return self.start + self.length

    @property
    def group(self) -> str:
        return KINDS[self.kind][1]

    def label(self) -> str:
        return f"{self.kind}({self.target})"


@dataclass(frozen=True, slots=True)
class Plan:
    seed: int
    duration: float
    faults: tuple[Fault, ...]


def _overlaps(a_start: float, a_end: float, b_start: float, b_end: float) -> bool:
    return a_start < b_end and b_start < a_end


def _fits(candidate: Fault, planned: list[Fault]) -> bool:
    for other in planned:
        gap = RECOVERY[other.group]
        if other.target == candidate.target and _overlaps(candidate.start, candidate.end, other.start, other.end + gap):
            return False
        # A group's faults never overlap, whatever their targets (a majority of nodes, one relay up).
        same_group = candidate.group and candidate.group == other.group
        if same_group and _overlaps(candidate.start, candidate.end + gap, other.start, other.end + gap):
            return False
    return True


def plan(
    seed: int,
    duration: float,
    *,
    mean_gap: float = 6.0,
    min_length: float = 1.0,
    max_length: float = 40.0,
    warmup: float = 5.0,
    quiet_tail: float = 5.0,
    kinds: tuple[str, ...] = tuple(KINDS),
) -> Plan:
    """Faults arriving every *mean_gap* s on average (exponential gaps), each of a random kind and
    target, 1–40 s long, between *warmup* and *duration* − *quiet_tail*; one that would break a limit
    is drawn again (up to five times) or left out."""
    rng = random.Random(seed)
    planned: list[Fault] = []
    t = warmup
    end = duration - quiet_tail
    while True:
        t += rng.expovariate(1.0 / mean_gap)
        if t >= end - min_length:
            break
        for _ in range(5):
            kind = rng.choice(kinds)
            target = rng.choice(KINDS[kind][0])
            length = round(min(rng.uniform(min_length, max_length), end - t), 1)
            candidate = Fault(round(t, 1), length, kind, target)
            if length >= min_length and _fits(candidate, planned):
                planned.append(candidate)
                break
    return Plan(seed, duration, tuple(planned))


def parse_duration(text: str) -> float:
    """``30m``, ``90s``, ``1h`` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)
