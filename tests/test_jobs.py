"""JobStore: queue order, moves, cancel, state changes, counters and crash recovery (SQLite WAL)."""

from __future__ import annotations

import sqlite3

import pytest

from scherzer.daemon.jobs import JobStore
from scherzer.daemon.protocol import ErrorCode, ProtocolError


def _submit(store: JobStore, name: str, position: int | None = None):
    plan = {"kind": "camera_image", "name": name, "exposure_s": 0.1}
    return store.submit(
        plan, kind="camera_image", name=name, submitter="alice", frames_total=1, position=position
    )


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_submit_orders_queue_and_records_submitter(store):
    a, b, c = (_submit(store, n) for n in "abc")
    assert [j.name for j in store.queue()] == ["a", "b", "c"]
    assert [j.queue_position for j in store.queue()] == [0, 1, 2]
    assert store.get(b.job_id).submitter == "alice"
    assert store.get(c.job_id).queue_position == 2
    assert store.next_queued().job_id == a.job_id


def test_submit_at_position_and_move(store):
    a, b = _submit(store, "a"), _submit(store, "b")
    c = _submit(store, "c", position=0)
    assert [j.name for j in store.queue()] == ["c", "a", "b"]
    store.move(c.job_id, 5)
    assert [j.name for j in store.queue()] == ["a", "b", "c"]
    store.move(b.job_id, 0)
    assert [j.job_id for j in store.queue()] == [b.job_id, a.job_id, c.job_id]


def test_move_refuses_non_queued_and_unknown(store):
    a = _submit(store, "a")
    store.start(a.job_id, "/tmp/none.h5")
    with pytest.raises(ProtocolError) as e:
        store.move(a.job_id, 0)
    assert e.value.code == ErrorCode.CONFLICT
    with pytest.raises(ProtocolError) as e:
        store.get(999)
    assert e.value.code == ErrorCode.NOT_FOUND


def test_cancel_queued_is_immediate_running_is_flagged(store):
    a, b = _submit(store, "a"), _submit(store, "b")
    store.start(a.job_id, "/tmp/a.h5")
    assert store.cancel(b.job_id).state == "cancelled"
    flagged = store.cancel(a.job_id)
    assert flagged.state == "running" and flagged.cancel_requested
    assert store.cancel_requested(a.job_id)
    store.set_state(a.job_id, "cancelled")
    with pytest.raises(ProtocolError) as e:
        store.cancel(a.job_id)
    assert e.value.code == ErrorCode.CONFLICT
    assert store.queue() == []


def test_counters_move_on_every_change(store):
    j0, q0 = store.jobs_counter, store.queue_counter
    a = _submit(store, "a")
    assert store.jobs_counter == j0 + 1 and store.queue_counter == q0 + 1
    store.set_progress(a.job_id, 0)
    assert store.jobs_counter == j0 + 2 and store.queue_counter == q0 + 1


def test_history_newest_first_with_filters(store):
    ids = [_submit(store, n).job_id for n in "abcd"]
    store.cancel(ids[1])
    assert [j.job_id for j in store.history()] == ids[::-1]
    assert [j.job_id for j in store.history(states=["cancelled"])] == [ids[1]]
    assert [j.job_id for j in store.history(limit=2, before_id=ids[3])] == [ids[2], ids[1]]


def test_recovery_marks_active_jobs_interrupted_and_keeps_queue(tmp_path):
    path = tmp_path / "jobs.sqlite"
    s = JobStore(path)
    a, b, c = (_submit(s, n) for n in "abc")
    s.start(a.job_id, str(tmp_path / "a.h5"))
    s.move(c.job_id, 0)
    s._db.close()  # simulate a crash: no orderly close

    s2 = JobStore(path)
    counted = []
    recovered = s2.recover(lambda p: counted.append(p) or 3)
    assert [j.job_id for j in recovered] == [a.job_id]
    job = s2.get(a.job_id)
    assert job.state == "interrupted" and job.frames_done == 3 and job.finished_s is not None
    assert counted == [str(tmp_path / "a.h5")]
    assert [j.job_id for j in s2.queue()] == [c.job_id, b.job_id]
    s2.close()


def test_database_is_wal(store):
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
