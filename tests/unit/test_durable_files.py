"""server/jobs/files/durable.py: atomic writes that concurrent writers of one job file survive."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from server.jobs.files.durable import private_temp_name, write_atomically


def test_temporary_names_are_private_and_hidden_beside_the_file(tmp_path: Path) -> None:
    target = tmp_path / "talk.mp4"
    names = {private_temp_name(target) for _ in range(50)}
    assert len(names) == 50
    assert all(n.parent == tmp_path and n.name.startswith(".talk.mp4.") and n.name.endswith(".tmp") for n in names)
    assert all(f".{os.getpid()}." in n.name for n in names)


def test_concurrent_writers_of_one_file_never_fail_and_leave_one_whole_version(tmp_path: Path) -> None:
    # A replica frozen past its lease wakes up and writes the same job file as the new holder:
    # with one shared "name.tmp" one writer's rename found the file already moved away.
    target = tmp_path / "talk.mp4"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(payloads))

    def writer(data: bytes) -> None:
        start.wait()
        try:
            for _ in range(20):
                write_atomically(target, data)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads  # one writer's whole content, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["talk.mp4"]  # no temporary file left


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    target = folder / "state.json"

    class Boom(Exception):
        pass

    def failing_fsync(fd: int) -> None:
        raise Boom

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Boom):
        write_atomically(target, b"{}")
    assert list(folder.iterdir()) == []
