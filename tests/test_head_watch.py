"""HeadWatch: a cluster counts as lost only after its head has been silent for `lost_after` seconds."""

from __future__ import annotations

import pytest

from batchgen.errors import ClusterLostError
from batchgen.head_watch import HeadWatch


class FakeHead:
    def __init__(self) -> None:
        self.now = 0.0
        self.answers = True
        self.probes = 0

    def clock(self) -> float:
        return self.now

    def probe(self) -> bool:
        self.probes += 1
        return self.answers


def test_a_silent_head_is_lost_after_lost_after_seconds_and_not_before():
    head = FakeHead()
    watch = HeadWatch(lost_after=20.0, probe=head.probe, clock=head.clock)
    head.now = 5.0
    watch.check()  # answers at 5 s
    head.answers = False
    for now in (6.0, 15.0, 24.0):
        head.now = now
        watch.check()  # silent for less than 20 s since the last answer: a GCS restart may still come back
    assert not watch.lost
    head.now = 25.0  # 20 s since the answer at 5 s
    with pytest.raises(ClusterLostError, match="has not answered for 20 s.*resume"):
        watch.check()
    assert watch.lost


def test_an_answer_resets_the_silence_and_probes_are_at_most_once_a_second():
    head = FakeHead()
    watch = HeadWatch(lost_after=10.0, probe=head.probe, clock=head.clock)
    head.answers = False
    head.now = 9.0
    watch.check()
    head.answers, head.now = True, 9.5
    watch.check()  # within a second of the last probe: not asked
    assert head.probes == 1
    head.now = 10.0
    watch.check()  # answers: the head came back (a GCS restart)
    head.answers, head.now = False, 19.0
    watch.check()  # silent 9 s since that answer, not 19 s since the start
    assert not watch.lost and head.probes == 3
