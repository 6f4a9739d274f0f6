"""The retry policy's arithmetic and the policy keys of the time limits."""

from __future__ import annotations

import pytest

from tether.core.errors import ConfigError
from tether.core.policy import parse_policy
from tether.core.timeouts import FINAL_STATE, EndReason, RetryPolicy


def test_delays_grow_by_the_coefficient_and_stop_at_the_maximum() -> None:
    """Delay n is min(initial * coefficient^(n-1), maximum), with no overflow at huge n."""
    p = RetryPolicy(100, 3.0, 1_000, 6)
    assert p.schedule_ms() == [100, 300, 900, 1_000, 1_000]
    assert p.delay_ms(10_000) == 1_000
    assert RetryPolicy(250, 1.0, 250, 3).schedule_ms() == [250, 250]


def test_failure_retries_need_the_flag_and_a_retryable_type() -> None:
    """A failure is retried only with retry_failures, unmarked and of an unlisted type."""
    p = RetryPolicy(retry_failures=True, non_retryable_reasons=("bad-input",))
    assert p.retries_failure("io", False)
    assert not p.retries_failure("io", True)
    assert not p.retries_failure("bad-input", False)
    assert not RetryPolicy().retries_failure("io", False)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("initial_interval_ms=0", "initial_interval_ms"),
        ("backoff_coefficient=0.5", "backoff_coefficient"),
        ("maximum_interval_ms=1, initial_interval_ms=2", "maximum_interval_ms"),
        ("maximum_attempts=0", "maximum_attempts"),
    ],
)
def test_an_inconsistent_retry_policy_is_refused(bad: str, message: str) -> None:
    """A retry policy that could not schedule attempts is refused when built."""
    with pytest.raises(ValueError, match=message):
        eval(f"RetryPolicy({bad})")


def test_every_end_reason_has_a_documented_final_state() -> None:
    """Each end reason maps to the state docs/policy.md gives it."""
    assert set(FINAL_STATE) == set(EndReason)


QUEUE = """
version = 1
[queues.q]
max_attempts = 4
attempt_timeout_ms = 5000
deadline_ms = 60000
schedule_to_start_timeout_ms = 2000
[queues.q.retry]
initial_interval_ms = 200
backoff_coefficient = 1.5
maximum_interval_ms = 900
retry_failures = true
non_retryable_reasons = ["bad-input"]
"""


def test_queue_limits_and_retry_table_parse() -> None:
    """The queue's limits and [retry] table become its defaults, attempts shared."""
    q = parse_policy(QUEUE).queues["q"]
    assert (q.attempt_timeout_ms, q.deadline_ms, q.schedule_to_start_timeout_ms) == (
        5000,
        60000,
        2000,
    )
    assert q.retry == RetryPolicy(200, 1.5, 900, 4, ("bad-input",), True)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("deadline_ms = 60000", "deadline_ms = 5"),
        ("backoff_coefficient = 1.5", "backoff_coefficient = 0.5"),
        ("maximum_interval_ms = 900", "maximum_interval_ms = 100"),
        ('non_retryable_reasons = ["bad-input"]', 'non_retryable_reasons = ["bad input"]'),
        ("retry_failures = true", "retry_failures = true\nmaximum_attempts = 2"),
        ("retry_failures = true", "retry_failures = true\nbogus = 1"),
    ],
)
def test_bad_limits_and_retry_keys_are_refused_naming_the_key(change: str, key: str) -> None:
    """Out-of-range limits, a coefficient below 1, a maximum below the initial interval,
    a malformed type, attempts that disagree and unknown keys are refused."""
    with pytest.raises(ConfigError, match=r"queues\.q"):
        parse_policy(QUEUE.replace(change, key))
