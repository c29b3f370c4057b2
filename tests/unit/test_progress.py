"""A recall call's progress, answer after answer, without sockets: what settles, what is asked again."""

from __future__ import annotations

import pytest

from relay.gateway.outcomes import NO_CODE, Answer, Outcome
from relay.gateway.progress import USERSIG, NoAnswer, Progress

LOST = NoAnswer("timeout", "no answer within 5 s", "timeout", True)
REFUSED_404 = NoAnswer("unreachable", "HTTP 404", "http_status", False)


def ok(**items: int) -> Answer:
    return Answer(0, "", {int(k[1:]): v for k, v in items.items()})


def fail(code: int, info: str = "") -> Answer:
    return Answer(code, info, None)


def test_group_ok_settles_each_seq_by_its_retcode() -> None:
    """One OK answer: recalled, not found and refused seqs settle; a transient one stays pending."""
    p = Progress([1, 2, 3, 4], "MsgSeq")
    assert "internal_error" == p.read(ok(s1=0, s2=10030, s3=10031, s4=10002))
    assert [4] == p.pending
    assert p.read(ok(s4=0)) is None
    assert ["recalled", "not_found", "rejected", "recalled"] == [o.status for o in p.outcomes(2)]


def test_top_level_fail_settles_everything_pending() -> None:
    """A final top-level code applies to every message the request carried, with Tencent's text."""
    p = Progress(["k1", "k2"], "MsgKey")
    assert p.read(fail(10010, "no such account")) is None
    assert [Outcome("rejected", 10010, "no such account")] * 2 == p.outcomes(1)


def test_missing_retcode_is_failed_not_recalled() -> None:
    """A seq the answer does not mention, or an OK without RecallRetList, is failed with code -1."""
    p = Progress([1, 2], "MsgSeq")
    assert p.read(ok(s1=0)) is None
    assert ("failed", NO_CODE) == (p.outcomes(1)[1].status, p.outcomes(1)[1].tencent_code)
    q = Progress([1], "MsgSeq")
    q.read(Answer(0, "", None))
    assert "failed" == q.outcomes(1)[0].status


def test_c2c_ok_and_already_recalled() -> None:
    """C2C has no list: OK is recalled, FAIL 20023 is already_recalled."""
    p = Progress(["k"], None)
    assert p.read(Answer(0, "", None)) is None
    assert "recalled" == p.outcomes(1)[0].status
    q = Progress(["k"], None)
    assert q.read(fail(20023)) is None
    assert "already_recalled" == q.outcomes(1)[0].status


def test_usersig_code_asks_for_one_regeneration_only() -> None:
    """The first 7000x asks for a new UserSig; a second one is final (rejected)."""
    p = Progress(["k"], None)
    assert USERSIG == p.read(fail(70001))
    assert p.read(fail(70009)) is None
    assert ("rejected", 70009) == (p.outcomes(2)[0].status, p.outcomes(2)[0].tencent_code)


@pytest.mark.parametrize(
    ("code", "reason"), [(60007, "rate_limited"), (60008, "tencent_timeout"), (91000, "internal_error")]
)
def test_transient_code_exhausted_is_failed_with_it(code: int, reason: str) -> None:
    """A transient code asks for a retry; left pending at the end it is failed with that code."""
    p = Progress(["k"], None)
    assert reason == p.read(fail(code))
    outcome = p.outcomes(1)
    assert [("failed", code)] == [(o.status, o.tencent_code) for o in outcome]
    assert "after 1 requests" in outcome[0].info


def test_lost_requests_retry_unless_pointless() -> None:
    """A lost answer asks for a retry by its reason; a non-retryable one (HTTP 404) stops the call."""
    p = Progress(["k"], None)
    assert "timeout" == p.lost(LOST)
    assert p.lost(REFUSED_404) is None
    assert not p.answered
    with pytest.raises(RuntimeError):
        p.outcomes(2)


def test_answer_then_lost_is_failed_with_the_code_and_the_loss() -> None:
    """Answered 60008, then the network failed: failed 60008, and the info says what came after."""
    p = Progress(["k"], None)
    p.read(fail(60008))
    p.lost(LOST)
    (outcome,) = p.outcomes(2)
    assert ("failed", 60008) == (outcome.status, outcome.tencent_code)
    assert outcome.info.endswith("then no answer within 5 s")


def test_not_found_after_a_lost_request_is_noted() -> None:
    """A group seq not found on the retry of a lost request may have been recalled by it: the info says so."""
    p = Progress([7], "MsgSeq")
    p.lost(LOST)
    p.read(ok(s7=10030))
    (outcome,) = p.outcomes(2)
    assert "not_found" == outcome.status
    assert "may have recalled it" in outcome.info
