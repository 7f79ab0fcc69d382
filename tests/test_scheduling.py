"""The scheduling policy's decisions, from what a batcher would show it: no threads, no clocks."""

from __future__ import annotations

import pytest

from serve.scheduling import (
    BATCH_SAVING,
    BATCH_WORK_S,
    DECODE_IN_PASS_MAX_BYTES,
    DECODE_IN_PASS_MAX_PIXELS,
    Backlog,
    Pass,
    PassTimes,
    Policy,
)


def two_cores(**options: object) -> Policy:
    """The default on a 2-core worker: two single-threaded passes side by side, or one with both."""
    return Policy(cores=2, passes=2, max_batch_size=16, **options)  # type: ignore[arg-type]


def test_a_lone_request_gets_one_pass_with_every_core() -> None:
    policy = two_cores()
    waiting = Backlog(queued_requests=1, queued_images=1)
    assert policy.can_start(waiting) and policy.delay_s(waiting) == 0
    assert policy.batch_limit(waiting) == 1
    assert policy.next_pass(Backlog()) == Pass(threads=2, wide=True)


def test_a_burst_is_split_into_fair_shares_of_narrow_passes() -> None:
    """The first of eight requests arriving together runs alone; seven queue behind it."""
    policy = two_cores()
    assert policy.next_pass(Backlog()) == Pass(threads=2, wide=True)
    burst = Backlog(queued_requests=7, queued_images=7, running_passes=1, images_in_passes=1)
    assert policy.can_start(burst)
    assert policy.batch_limit(burst) == 4  # eight images in sight, two passes: at most four each
    after = Backlog(queued_requests=3, queued_images=3, running_passes=1, images_in_passes=4 + 1)
    assert policy.next_pass(after) == Pass(threads=1, wide=False)
    assert not policy.can_start(Backlog(queued_requests=3, queued_images=3, running_passes=2))  # no third pass


def test_under_steady_load_a_pass_is_narrow_even_when_the_queue_is_empty_for_a_moment() -> None:
    """Eight clients, each sending again when answered: one pass ends, its clients' next requests
    are still on their way (being decoded) or the other pass still runs."""
    policy = two_cores()
    assert policy.next_pass(Backlog(running_passes=1, images_in_passes=4)) == Pass(threads=1, wide=False)
    assert policy.next_pass(Backlog(incoming=1)) == Pass(threads=1, wide=False)
    assert policy.next_pass(Backlog(queued_requests=1, queued_images=1)) == Pass(threads=1, wide=False)
    assert policy.next_pass(Backlog()) == Pass(threads=2, wide=True)  # nothing at all in sight: alone


def test_the_fair_share_counts_images_queued_and_in_passes() -> None:
    policy = two_cores()
    # Six images queued, four in the pass running: ten in sight, at most five for this pass.
    assert policy.batch_limit(Backlog(queued_requests=6, queued_images=6, running_passes=1,
                                      images_in_passes=4)) == 5
    # Images, not requests: two requests of five images each.
    assert policy.batch_limit(Backlog(queued_requests=2, queued_images=10)) == 5


def test_batches_stop_at_the_largest_batch_size() -> None:
    policy = two_cores()
    assert policy.batch_limit(Backlog(queued_requests=100, queued_images=100)) == 16
    one_pass = Policy(cores=4, passes=1, max_batch_size=8)
    assert one_pass.batch_limit(Backlog(queued_requests=6, queued_images=6)) == 6  # no share to keep back


def test_one_pass_at_a_time_always_has_every_core_on_the_wide_thread() -> None:
    """A GPU model (or CLASSIFIER_INFERENCE_THREADS=1): each pass is the only one."""
    policy = Policy(cores=4, passes=1)
    assert policy.next_pass(Backlog(queued_requests=3, queued_images=3)) == Pass(threads=4, wide=True)
    assert policy.widths() == (4,)


def test_single_threaded_passes_side_by_side_are_never_wide_under_load() -> None:
    policy = Policy(cores=1, passes=2)
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


def test_one_pass_with_every_core_decodes_nothing_itself() -> None:
    """Decoding inside the only pass would leave all but one of its cores idle meanwhile."""
    assert not Policy(cores=2, passes=1, decode_in_pass=True).decodes_in_pass(50_000, lambda: 500 * 375)


def test_one_core_decodes_in_its_pass() -> None:
    assert Policy(cores=1, passes=1, decode_in_pass=True).decodes_in_pass(50_000, lambda: 500 * 375)


def test_nonsense_is_refused() -> None:
    for options in ({"cores": 0}, {"cores": 1, "passes": 0}, {"cores": 1, "max_batch_size": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            Policy(**options)  # type: ignore[arg-type]


def test_a_pass_gathers_only_the_images_worth_batching() -> None:
    """On a CPU where a batch costs each image nearly what one alone does, a pass takes more than
    one image only up to BATCH_WORK_S of work, by the time one image took."""
    slow = two_cores(times=PassTimes(one_s=BATCH_WORK_S * 1.5, batched_s=BATCH_WORK_S * 1.45))
    fast = two_cores(times=PassTimes(one_s=BATCH_WORK_S / 5.5, batched_s=BATCH_WORK_S / 5.6))
    crowd = Backlog(queued_requests=12, queued_images=12, running_passes=1, images_in_passes=4)
    assert (slow.useful_batch, fast.useful_batch, two_cores().useful_batch) == (1, 5, 16)
    assert slow.batch_limit(crowd) == 1
    assert fast.batch_limit(crowd) == 5  # the fair share would be eight
    assert two_cores().batch_limit(crowd) == 8
    tiny = PassTimes(one_s=BATCH_WORK_S / 100, batched_s=BATCH_WORK_S / 100)
    assert two_cores(times=tiny).useful_batch == 16  # never past the largest batch
    # A delay waits for a useful batch, not for one the pass would not take.
    assert two_cores(times=slow.times, max_delay_s=0.01).delay_s(Backlog(queued_requests=1, queued_images=1)) == 0.0
    assert fast.delay_s(Backlog(queued_requests=1, queued_images=1)) == 0.0  # no delay set: none
    assert two_cores(times=fast.times, max_delay_s=0.01).delay_s(Backlog(queued_requests=4, queued_images=4)) == 0.01


def test_a_pass_takes_a_full_batch_where_batching_saves_per_image() -> None:
    """However long one image takes, a batch whose images cost BATCH_SAVING less each is worth it."""
    one_s = BATCH_WORK_S * 2
    saves = two_cores(times=PassTimes(one_s, batched_s=one_s * (1 - BATCH_SAVING) * 0.99))
    barely = two_cores(times=PassTimes(one_s, batched_s=one_s * (1 - BATCH_SAVING) * 1.01))
    assert (saves.useful_batch, barely.useful_batch) == (16, 1)
    assert saves.batch_limit(Backlog(queued_requests=12, queued_images=12, running_passes=1,
                                     images_in_passes=4)) == 8  # then only the fair share bounds it


def test_a_model_whose_batch_failed_takes_one_image_a_pass_and_an_untimed_one_is_unbounded() -> None:
    failed = two_cores(times=PassTimes(one_s=BATCH_WORK_S / 10, batched_s=None))
    assert failed.useful_batch == 1
    assert failed.batch_limit(Backlog(queued_requests=6, queued_images=6)) == 1
    assert two_cores(times=PassTimes(one_s=0.0, batched_s=0.0)).useful_batch == 16  # too fast to time
