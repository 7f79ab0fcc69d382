"""The scheduling policy's decisions, from what a batcher would show it: no threads, no clocks."""

from __future__ import annotations

import pytest

from serve.scheduling import (
    DECODE_IN_PASS_MAX_BYTES,
    DECODE_IN_PASS_MAX_PIXELS,
    ONE_AT_A_TIME,
    Backlog,
    Pass,
    Policy,
)


def two_cores(**options: object) -> Policy:
    """The default on a 2-core worker: two single-threaded passes side by side, or one with both."""
    return Policy(cores=2, passes=2, max_batch_size=16, **options)  # type: ignore[arg-type]


def arrive(policy: Policy, backlog: Backlog) -> None:
    """A request queued into ``backlog`` (which counts it)."""
    policy.arrived(backlog)


def test_a_lone_request_gets_one_pass_with_every_core() -> None:
    policy = two_cores()
    waiting = Backlog(queued_requests=1, queued_images=1)
    arrive(policy, waiting)
    assert policy.can_start(waiting) and policy.delay_s(waiting) == 0
    assert policy.batch_limit(waiting) == 1
    assert policy.next_pass(Backlog()) == Pass(threads=2, wide=True)


def test_requests_one_at_a_time_stay_wide() -> None:
    policy = two_cores()
    for _ in range(50):
        arrive(policy, Backlog(queued_requests=1, queued_images=1))
        assert policy.next_pass(Backlog()) == Pass(2, wide=True)


def test_a_pass_starting_beside_another_is_narrow_and_takes_its_fair_share() -> None:
    policy = two_cores()
    arrive(policy, Backlog(queued_requests=1, queued_images=1))
    policy.next_pass(Backlog())  # the first runs alone
    # Seven arrive together while it runs: each found the first in its pass and those before it.
    for queued in range(1, 8):
        arrive(policy, Backlog(queued_requests=queued, queued_images=queued, running_passes=1,
                               requests_in_passes=1, images_in_passes=1))
    burst = Backlog(queued_requests=7, queued_images=7, running_passes=1, requests_in_passes=1, images_in_passes=1)
    assert policy.can_start(burst)
    assert policy.batch_limit(burst) == 4  # eight images in sight, two passes: at most four each
    after = Backlog(queued_requests=3, queued_images=3, running_passes=1, requests_in_passes=1, images_in_passes=1)
    assert policy.next_pass(after) == Pass(threads=1, wide=False)


def test_no_third_pass_while_two_run() -> None:
    policy = two_cores()
    assert not policy.can_start(Backlog(queued_requests=5, queued_images=5, running_passes=2))
    assert not policy.can_start(Backlog())  # nothing to run


def test_after_a_burst_the_queue_emptying_for_a_moment_does_not_make_a_pass_wide() -> None:
    policy = two_cores()
    for queued in range(1, 9):  # eight at once
        arrive(policy, Backlog(queued_requests=queued, queued_images=queued))
    assert policy.recent_load >= ONE_AT_A_TIME
    # Steady load: the queue is empty right now, but a request comes back with each answer.
    assert policy.next_pass(Backlog()) == Pass(threads=1, wide=False)
    passes = []
    for _ in range(12):  # then one at a time: the average decays and passes go wide again
        arrive(policy, Backlog(queued_requests=1, queued_images=1))
        passes.append(policy.next_pass(Backlog()).threads)
    assert passes[0] == 1 and passes[-1] == 2 and passes == sorted(passes)


def test_no_pass_goes_wide_while_a_request_is_on_its_way() -> None:
    policy = two_cores()
    arrive(policy, Backlog(queued_requests=1, queued_images=1))
    assert policy.next_pass(Backlog(incoming=1)) == Pass(threads=1, wide=False)
    assert policy.next_pass(Backlog(running_passes=1, requests_in_passes=1)) == Pass(threads=1, wide=False)


def test_batches_stop_at_the_largest_batch_size() -> None:
    policy = two_cores()
    assert policy.batch_limit(Backlog(queued_requests=100, queued_images=100)) == 16
    one_pass = Policy(cores=4, passes=1, max_batch_size=8)
    assert one_pass.batch_limit(Backlog(queued_requests=6, queued_images=6)) == 6  # no share to keep back


def test_one_pass_at_a_time_always_has_every_core_on_the_wide_thread() -> None:
    """A GPU model (or CLASSIFIER_INFERENCE_THREADS=1): each pass is the only one."""
    policy = Policy(cores=4, passes=1)
    for queued in range(1, 9):
        arrive(policy, Backlog(queued_requests=queued, queued_images=queued))
    assert policy.next_pass(Backlog(queued_requests=3, queued_images=3)) == Pass(threads=4, wide=True)
    assert policy.widths() == (4,)


def test_single_threaded_passes_side_by_side_are_never_wide_under_load() -> None:
    policy = Policy(cores=1, passes=2)
    arrive(policy, Backlog(queued_requests=1, queued_images=1))
    assert policy.next_pass(Backlog()) == Pass(threads=1, wide=True)
    assert policy.next_pass(Backlog(running_passes=1)) == Pass(threads=1, wide=False)  # on the shared threads


def test_without_cores_the_policy_never_sets_threads() -> None:
    policy = Policy(cores=None, passes=2)
    assert policy.next_pass(Backlog()) == Pass(threads=None, wide=False)
    assert policy.widths() == ()


def test_widths_are_every_thread_count_a_pass_may_get() -> None:
    assert two_cores().widths() == (1, 2)
    assert Policy(cores=8, passes=2).widths() == (4, 8)
    assert Policy(cores=3, passes=4).widths() == (1, 3)


def test_a_delay_waits_only_for_a_batch_that_is_not_full() -> None:
    policy = two_cores(max_delay_s=0.005)
    assert policy.delay_s(Backlog(queued_requests=2, queued_images=2)) == 0.005
    assert policy.delay_s(Backlog(queued_requests=16, queued_images=16)) == 0
    assert two_cores().delay_s(Backlog(queued_requests=1, queued_images=1)) == 0


def test_small_images_are_decoded_by_their_pass_on_a_cpu_with_passes_side_by_side() -> None:
    cpu = two_cores(decode_in_pass=True)
    assert cpu.decodes_in_pass(50_000, lambda: 500 * 375)
    assert not cpu.decodes_in_pass(DECODE_IN_PASS_MAX_BYTES + 1, lambda: 500 * 375)  # a large body
    assert not cpu.decodes_in_pass(3_000, lambda: DECODE_IN_PASS_MAX_PIXELS + 1)  # a small PNG of many pixels
    assert not cpu.decodes_in_pass(3_000, lambda: None)  # a header that cannot be read


def test_the_pixels_are_counted_only_for_a_small_body() -> None:
    def never() -> int:
        raise AssertionError("counted the pixels of a body too large to decode in the pass")

    assert not two_cores(decode_in_pass=True).decodes_in_pass(DECODE_IN_PASS_MAX_BYTES + 1, never)


@pytest.mark.parametrize(("policy", "why"), [
    (Policy(cores=2, passes=2, decode_in_pass=False), "a GPU model: decoded beforehand, the GPU never waits"),
    (Policy(cores=2, passes=1, decode_in_pass=True), "one pass with both cores: decoding in it idles one core"),
])
def test_no_decoding_in_the_pass_where_it_would_leave_the_device_or_a_core_waiting(policy: Policy, why: str) -> None:
    assert not policy.decodes_in_pass(50_000, lambda: 500 * 375), why


def test_one_core_decodes_in_its_pass() -> None:
    assert Policy(cores=1, passes=1, decode_in_pass=True).decodes_in_pass(50_000, lambda: 500 * 375)


def test_nonsense_is_refused() -> None:
    for options in ({"cores": 0}, {"cores": 1, "passes": 0}, {"cores": 1, "max_batch_size": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            Policy(**options)  # type: ignore[arg-type]
