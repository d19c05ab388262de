"""torch's intra-op thread count is one value for the whole process (docs/decisions.md).

The server relies on it: ``--threads`` is one count for every model's worker, because a
count set on one worker's thread is the count every other thread's kernels use next.
If a torch release makes the count per thread, this fails and the decision can change.
"""

from __future__ import annotations

import threading

import torch


def test_a_count_set_on_one_thread_is_the_count_another_thread_reads() -> None:
    before = torch.get_num_threads()
    seen: dict[str, int] = {}
    first_set, second_set = threading.Event(), threading.Event()

    def first() -> None:
        torch.set_num_threads(1)
        first_set.set()
        second_set.wait(10)
        seen["first"] = torch.get_num_threads()

    def second() -> None:
        first_set.wait(10)
        torch.set_num_threads(3)
        second_set.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"first": 3}
    finally:
        torch.set_num_threads(before)
