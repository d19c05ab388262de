"""shm.py: a producer's segment is copied out, never mapped; odd files are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradstream.server.errors import InvalidArgument, PermissionDenied
from gradstream.server.shm import open_shared_memory

PEER = "ipv4:127.0.0.1:5555"


def test_reads_are_copies_and_a_shrunk_segment_is_an_error_not_a_fault(tmp_path: Path) -> None:
    path = tmp_path / "gradstream-a"
    path.write_bytes(bytes(range(16)) * 512)
    segment = open_shared_memory(path.name, PEER, str(tmp_path))
    assert len(segment) == 8192
    data = segment[8:16]
    assert data == bytes(range(8, 16))
    path.write_bytes(b"\xff" * 8192)  # rewritten in place: the copy taken before is unchanged
    assert data == bytes(range(8, 16))
    os.truncate(path, 0)
    with pytest.raises(InvalidArgument, match="shrank"):
        segment[4096:4104]


def test_symlinks_fifos_hard_links_and_other_owners_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"token")
    (tmp_path / "gradstream-link").symlink_to(secret)
    with pytest.raises(InvalidArgument, match="cannot open segment"):
        open_shared_memory("gradstream-link", PEER, str(tmp_path))
    os.mkfifo(tmp_path / "gradstream-fifo")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        open_shared_memory("gradstream-fifo", PEER, str(tmp_path))
    os.link(secret, tmp_path / "gradstream-hard")
    with pytest.raises(InvalidArgument, match="has 2 links"):
        open_shared_memory("gradstream-hard", PEER, str(tmp_path))
    if os.geteuid() == 0:
        other = tmp_path / "gradstream-other"
        other.write_bytes(b"x" * 64)
        os.chown(other, 65534, 65534)
        with pytest.raises(PermissionDenied, match="owned by uid 65534"):
            open_shared_memory("gradstream-other", PEER, str(tmp_path))


def test_names_are_matched_whole_and_remote_peers_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a gradstream segment name"):
        open_shared_memory("gradstream-a\n", PEER, str(tmp_path))
    with pytest.raises(PermissionDenied, match="server's host"):
        open_shared_memory("gradstream-a", "ipv4:10.0.0.1:5555", str(tmp_path))


def test_a_segment_shrunk_inside_a_span_is_an_error_and_reads_are_writable_copies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gradstream-b"
    path.write_bytes(bytes(range(256)) * 64)
    segment = open_shared_memory(path.name, PEER, str(tmp_path))
    data = segment[1000:9000]
    assert bytes(data) == (bytes(range(256)) * 64)[1000:9000]
    assert not data.readonly  # the tensor over it is the server's own copy
    os.truncate(path, 5000)  # the first part of the span is still there, the rest is not
    with pytest.raises(InvalidArgument, match=r"shrank: bytes \[1000, 9000\)"):
        segment[1000:9000]
