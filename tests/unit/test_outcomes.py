"""Reading Tencent's answers: each code's class, the answer decoder, the Reason cut, the batch rule."""

from __future__ import annotations

import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from relay.gateway.outcomes import (
    NO_CODE,
    Answer,
    action,
    check_batch,
    cut_reason,
    describe,
    read_answer,
    retry_reason,
    status_of,
)
from relay.gateway.tencent_api import backoff_delay


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param(0, ("final", "recalled"), id="ok"),
        pytest.param(20023, ("final", "already_recalled"), id="c2c-already-recalled"),
        pytest.param(20022, ("final", "not_found"), id="c2c-not-found"),
        pytest.param(10030, ("final", "not_found"), id="group-not-found"),
        pytest.param(91000, ("retry", None), id="c2c-internal"),
        pytest.param(10002, ("retry", None), id="group-internal"),
        pytest.param(60008, ("retry", None), id="tencent-timeout"),
        pytest.param(60007, ("retry", None), id="rate-limited-60007"),
        pytest.param(60011, ("retry", None), id="rate-limited-60011"),
        pytest.param(60018, ("retry", None), id="rate-limited-60018"),
        pytest.param(60019, ("retry", None), id="rate-limited-60019"),
        pytest.param(70001, ("regenerate", "rejected"), id="usersig-expired"),
        pytest.param(70003, ("regenerate", "rejected"), id="usersig-truncated"),
        pytest.param(70009, ("regenerate", "rejected"), id="usersig-wrong-key"),
        pytest.param(70013, ("regenerate", "rejected"), id="usersig-identifier"),
        pytest.param(90009, ("final", "rejected"), id="needs-admin-c2c"),
        pytest.param(60010, ("final", "rejected"), id="needs-admin"),
        pytest.param(90054, ("final", "rejected"), id="bad-msgkey"),
        pytest.param(10004, ("final", "rejected"), id="bad-parameter"),
        pytest.param(10015, ("final", "rejected"), id="bad-groupid"),
        pytest.param(10007, ("final", "rejected"), id="no-permission"),
        pytest.param(10031, ("final", "rejected"), id="past-time-limit"),
        pytest.param(60021, ("final", "rejected"), id="ip-not-allowed"),
        pytest.param(12345, ("final", "rejected"), id="unknown-code"),
        pytest.param(NO_CODE, ("final", "rejected"), id="no-code"),
    ],
)
def test_each_code_class(code: int, expected: tuple[str, str | None]) -> None:
    """Success codes, not-found codes, transient codes, UserSig codes and refusals are told apart."""
    kind, status = expected
    assert kind == action(code)
    if status is not None:
        assert status == status_of(code)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (60007, "rate_limited"),
        (60019, "rate_limited"),
        (60008, "tencent_timeout"),
        (91000, "internal_error"),
        (10002, "internal_error"),
        (70001, "usersig"),
    ],
)
def test_retry_reasons_are_bounded_labels(code: int, reason: str) -> None:
    """Each retried code maps to one of the documented retry reasons."""
    assert reason == retry_reason(code)


def test_describe_prefers_tencents_text() -> None:
    """ErrorInfo wins; without it the documented meaning is used; an unknown code has none."""
    assert "custom" == describe(10031, "custom")
    assert "past the recall time limit" == describe(10031)
    assert "" == describe(12345)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""}, Answer(0, "", None), id="ok"),
        pytest.param({"ActionStatus": "OK"}, Answer(0, "", None), id="ok-without-code"),
        pytest.param(
            {"ActionStatus": "FAIL", "ErrorCode": 20022, "ErrorInfo": "gone"}, Answer(20022, "gone", None), id="fail"
        ),
        pytest.param({"ActionStatus": "FAIL"}, Answer(NO_CODE, "", None), id="fail-without-code"),
        pytest.param({"ActionStatus": "FAIL", "ErrorCode": 0}, Answer(NO_CODE, "", None), id="fail-with-zero"),
        pytest.param({"ErrorCode": "60008"}, Answer(60008, "", None), id="code-as-string"),
        pytest.param({"ErrorCode": 70001, "ErrorInfo": 5}, Answer(70001, "", None), id="info-not-text"),
        pytest.param({"ActionStatus": "MAYBE"}, None, id="unknown-status"),
        pytest.param({"ErrorCode": True}, None, id="code-is-bool"),
        pytest.param([1, 2], None, id="not-an-object"),
    ],
)
def test_read_answer_top_level(doc: object, expected: Answer | None) -> None:
    """ErrorCode is the truth; ActionStatus fills a missing code; a non-answer is None."""
    assert expected == read_answer(doc, None)


def test_read_answer_per_item_codes() -> None:
    """RecallRetList is read per item; a seq sent as a string still matches, broken entries are skipped."""
    doc = {
        "ActionStatus": "OK",
        "ErrorCode": 0,
        "RecallRetList": [
            {"MsgSeq": 101, "RetCode": 0},
            {"MsgSeq": "102", "RetCode": 10030},
            {"MsgSeq": 103},
            "junk",
            {"MsgSeq": True, "RetCode": 0},
        ],
    }
    answer = read_answer(doc, "MsgSeq")
    assert answer is not None
    assert {101: 0, 102: 10030} == answer.items
    keyed = read_answer({"ActionStatus": "OK", "RecallRetList": [{"MsgKey": "k1", "RetCode": 10002}]}, "MsgKey")
    assert keyed is not None
    assert {"k1": 10002} == keyed.items


def test_read_answer_without_list_has_no_items() -> None:
    """An OK without RecallRetList yields items None, so no message is taken for recalled."""
    answer = read_answer({"ActionStatus": "OK", "ErrorCode": 0}, "MsgSeq")
    assert answer is not None
    assert answer.items is None


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        pytest.param("spam link", "spam link", id="short"),
        pytest.param("a" * 100, "a" * 100, id="exactly-100"),
        pytest.param("a" * 101, "a" * 100, id="ascii-101"),
        pytest.param("撤" * 40, "撤" * 33, id="cjk-3-bytes"),
        pytest.param("a" + "撤" * 40, "a" + "撤" * 33, id="cjk-offset-1"),
        pytest.param("ab" + "撤" * 40, "ab" + "撤" * 32, id="cjk-offset-2"),
        pytest.param("😀" * 30, "😀" * 25, id="emoji-4-bytes"),
        pytest.param("abc" + "😀" * 30, "abc" + "😀" * 24, id="emoji-offset-3"),
        pytest.param("é" * 60, "é" * 50, id="two-byte"),
    ],
)
def test_reason_is_cut_to_100_bytes_on_a_character_boundary(reason: str, expected: str) -> None:
    """CJK (3 bytes) and emoji (4 bytes) are never split; the cut keeps as much as fits."""
    cut = cut_reason(reason)
    assert expected == cut
    assert len(cut.encode()) <= 100


@given(st.text(max_size=300))
def test_reason_cut_is_the_longest_prefix_that_fits(text: str) -> None:
    """For any text, the cut is a prefix of whole graphemes, at most 100 bytes, and maximal: the next
    grapheme would not fit."""
    cut = cut_reason(text)
    assert text.startswith(cut)
    assert len(cut.encode()) <= 100
    clusters = regex.findall(r"\X", text)
    boundaries = {sum(len(c) for c in clusters[:i]) for i in range(len(clusters) + 1)}
    assert len(cut) in boundaries
    if cut != text:
        following = regex.match(r"\X", text[len(cut) :])
        assert following is not None
        assert len((cut + following.group()).encode()) > 100


@pytest.mark.parametrize(
    "items",
    [pytest.param([], id="empty"), pytest.param(list(range(11)), id="eleven"), pytest.param([1, 2, 1], id="duplicate")],
)
def test_batches_outside_the_rule_are_refused(items: list[int]) -> None:
    """Zero, more than ten, or a repeated key in one call is a ValueError."""
    with pytest.raises(ValueError, match="message"):
        check_batch(items)


def test_ten_distinct_items_are_a_batch() -> None:
    """Ten distinct keys pass."""
    check_batch([str(i) for i in range(10)])


@pytest.mark.parametrize("retry", [1, 2, 3, 4, 10])
def test_backoff_is_exponential_with_equal_jitter(retry: int) -> None:
    """Delay d = min(cap, base·2^(n-1)), floored; the jittered value lies in [d/2, d]."""
    d = min(4.0, 0.25 * 2 ** (retry - 1))
    for _ in range(50):
        assert d / 2 <= backoff_delay(retry, 0.25, 4.0) <= d
        assert 0.5 <= backoff_delay(retry, 0.25, 4.0, floor=1.0) <= max(1.0, d)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        pytest.param("a" * 99 + "e\u0301", "a" * 99, id="letter-and-its-accent-stay-together"),
        pytest.param("a" * 96 + "👩\u200d💻", "a" * 96, id="emoji-zwj-sequence-whole-or-not-at-all"),
        pytest.param("a" * 89 + "👩\u200d💻", "a" * 89 + "👩\u200d💻", id="fits-exactly-in-100-bytes"),
        pytest.param("广" * 34, "广" * 33, id="cjk-on-a-character-boundary"),
        pytest.param("🇨🇳" * 13, "🇨🇳" * 12, id="flags-are-pairs"),
    ],
)
def test_the_reason_for_tencent_is_cut_on_a_grapheme_boundary(reason: str, expected: str) -> None:
    """At most 100 UTF-8 bytes, never splitting what a person sees as one character."""
    cut = cut_reason(reason)
    assert expected == cut
    assert len(cut.encode()) <= 100
