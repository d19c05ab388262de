"""A slice of the suite, rerun against servers in ingest=process mode (a front process).

The tests are not copied: ``GRADSTREAM_TEST_INGEST=process`` makes ``tests/conftest.py``'s
``server_settings`` (and so the ``server`` fixture and every test server built from it) run
behind a front, and the slice runs in a pytest of its own with that set.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import INGEST, ROOT

# Bitwise against the plain loop, tokens, exactly-once producers and drain, the client's
# shared memory, status codes, metrics, a client's cancel and deadline reaching the model's
# queue; and the check that the servers really ran behind a front.
SLICE = (
    "tests/integration/test_front.py::test_the_test_server_runs_in_the_mode_asked",
    "tests/integration/test_exactness.py",
    "tests/integration/test_auth.py",
    "tests/integration/test_producer.py",
    "tests/integration/test_shared_memory.py",
    "tests/integration/test_status_codes.py",
    "tests/integration/test_metrics.py",
    "tests/integration/test_cancel.py",
)
# Slow here and no more telling behind a front: the CLI's own server processes (started
# inline), a second, checkpointed run of a shared-memory producer, a full producer buffer.
LEFT_OUT = (
    "tests/integration/test_auth.py::test_cli_refuses_0_0_0_0_without_tokens_and_starts_with_insecure",
    "tests/integration/test_auth.py::test_cli_client_flags_carry_tls_and_token",
    "tests/integration/test_shared_memory.py::"
    "test_a_producer_streams_through_shared_memory_exactly_like_bytes[True]",
    "tests/integration/test_producer.py::test_a_full_buffer_asks_the_server_for_a_checkpoint",
)


def test_the_slice_passes_with_every_server_behind_a_front() -> None:
    if INGEST == "process":
        return  # this run is the slice's own
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SLICE),
            *(f"--deselect={test}" for test in LEFT_OUT),
        ],
        cwd=ROOT,
        env={**os.environ, "GRADSTREAM_TEST_INGEST": "process"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
