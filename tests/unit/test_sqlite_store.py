"""What only the SQLite store promises: the file outlives the process and a
crash, several processes share it, read-only openers, schema versioning and
a bounded change log.  The shared contract is in tests/contract/."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from csi_virtvol import errors
from csi_virtvol.model.array import Lun, LunState
from csi_virtvol.model.ids import ArrayId, LunId, Revision
from csi_virtvol.store.base import ARRAYS, LUNS, VOLUMES, Table
from csi_virtvol.store.sqlite import SCHEMA_VERSION, SqliteStore


def lun(arr: str, ident: str, *, volume: str = "", size: int = 1 << 20) -> Lun:
    return Lun(array=ArrayId(arr), id=LunId(ident), size=size, address=f"/pool/{arr}/{ident}",
               state=LunState.IN_USE if volume else LunState.INTACT, volume=volume)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
def store(db: str) -> Iterator[SqliteStore]:
    with SqliteStore(db) as s:
        yield s


def raw(db: str) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


# -- revisions and persistence ------------------------------------------------

def test_revisions_are_increasing_integers_across_tables(store: SqliteStore) -> None:
    revs = [store.create(LUNS, lun("a", "1"))]
    revs.append(store.update(LUNS, lun("a", "1", volume="v"), revision=revs[-1]))
    store.delete(LUNS, "a:1")
    revs.append(store.create(LUNS, lun("a", "1")))  # after a delete: still moves forward
    revs.append(store.create(LUNS, lun("a", "2")))
    as_int = [int(r) for r in revs]
    assert as_int == sorted(as_int) and len(set(as_int)) == len(as_int)
    assert all(r == str(int(r)) for r in revs)


def test_persists_across_reopen(db: str) -> None:
    with SqliteStore(db) as s:
        r1 = s.create(LUNS, lun("a", "1", volume="v1"))
        s.create(LUNS, lun("a", "2"))
        s.delete(LUNS, "a:2")
    with SqliteStore(db) as s:
        got = s.get(LUNS, "a:1")
        assert got is not None and got.value == lun("a", "1", volume="v1") and got.revision == r1
        assert s.get(LUNS, "a:2") is None
        assert [v.value.key for v in s.find(LUNS, index="volume", value="v1")] == ["a:1"]
        r2 = s.update(LUNS, lun("a", "1"), revision=r1)
        assert int(r2) > int(r1) + 1  # the counter did not restart; the delete took one too
        with pytest.raises(errors.Conflict):
            s.update(LUNS, lun("a", "1"), revision=r1)


def test_file_is_wal_and_versioned(store: SqliteStore, db: str) -> None:
    store.create(LUNS, lun("a", "1"))
    conn = raw(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0] \
            == str(SCHEMA_VERSION)
        assert conn.execute("SELECT tbl, key FROM records").fetchall() == [("luns", "a:1")]
        body = json.loads(conn.execute("SELECT body FROM records").fetchone()[0])
        assert body["state"] == "intact" and body["array"] == "a"
    finally:
        conn.close()


def test_newer_schema_is_refused(db: str) -> None:
    SqliteStore(db).close()
    conn = raw(db)
    conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(errors.BackendError, match="schema version"):
        SqliteStore(db)


def test_not_a_database_is_backend_error(db: str) -> None:
    Path(db).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(errors.BackendError):
        SqliteStore(db)


def test_foreign_revision_conflicts(store: SqliteStore) -> None:
    store.create(LUNS, lun("a", "1"))
    with pytest.raises(errors.Conflict):
        store.update(LUNS, lun("a", "1"), revision=Revision("rv-abc"))
    with pytest.raises(errors.Conflict):
        store.delete(LUNS, "a:1", revision=Revision(""))
    assert store.get(LUNS, "a:1") is not None


def test_closed_store_refuses(db: str) -> None:
    s = SqliteStore(db)
    s.create(LUNS, lun("a", "1"))
    s.close()
    s.close()
    with pytest.raises(errors.BackendUnavailable):
        s.get(LUNS, "a:1")


def test_negative_limit_is_invalid(store: SqliteStore) -> None:
    with pytest.raises(errors.InvalidRequest):
        store.list(LUNS, limit=-1)


# -- indexes added after records exist ------------------------------------------

LUNS_BY_STATE: Table[Lun] = Table(
    name="luns", type=Lun, key=lambda x: x.key,
    indexes={**LUNS.indexes, "state": lambda x: x.state.value},
)


def test_new_index_over_existing_records(db: str) -> None:
    with SqliteStore(db) as s:
        s.create(LUNS, lun("a", "1"))
        s.create(LUNS, lun("a", "2", volume="v"))
    with SqliteStore(db) as s:
        # Before any write with the new table: answered by a scan.
        assert [v.value.key for v in s.find(LUNS_BY_STATE, index="state", value="in-use")] == ["a:2"]
        s.create(LUNS_BY_STATE, lun("b", "1", volume="w"))  # the write materialises the index
        assert [v.value.key for v in s.find(LUNS_BY_STATE, index="state", value="in-use")] == ["a:2", "b:1"]
        assert [v.value.key for v in s.find(LUNS_BY_STATE, index="state", value="intact")] == ["a:1"]
        assert [v.value.key for v in s.find(LUNS_BY_STATE, index="array", value="a")] == ["a:1", "a:2"]
        conn = raw(db)
        try:
            names = conn.execute("SELECT DISTINCT name FROM idx WHERE tbl = 'luns' ORDER BY name").fetchall()
        finally:
            conn.close()
        assert names == [("array",), ("state",), ("volume",)]
        # The old definition writes again: its index rows are rebuilt, and stay right.
        s.create(LUNS, lun("c", "1"))
        assert [v.value.key for v in s.find(LUNS, index="volume", value="")] == ["a:1", "c:1"]
        assert [v.value.key for v in s.find(LUNS_BY_STATE, index="state", value="intact")] == ["a:1", "c:1"]


# -- the change log -------------------------------------------------------------

def test_change_log_is_bounded(db: str) -> None:
    with SqliteStore(db, log_retention=64) as s:
        stale_watch = s.watch(LUNS, timeout=5)
        rev = s.create(LUNS, lun("a", "1"))
        for i in range(400):
            rev = s.update(LUNS, lun("a", "1", size=i + 1), revision=rev)
        conn = raw(db)
        try:
            (count,) = conn.execute("SELECT count(*) FROM changes").fetchone()
        finally:
            conn.close()
        assert count <= 2 * 64
        with pytest.raises(errors.Conflict, match="list again"):
            next(stale_watch)
        # A watch started now works.
        fresh = s.watch(LUNS, timeout=30)
        s.update(LUNS, lun("a", "1", size=7), revision=rev)
        change = next(fresh)
        assert change.kind == "put" and change.value is not None and change.value.size == 7


# -- read-only openers ----------------------------------------------------------

def test_readonly_sees_writes_and_refuses_to_write(store: SqliteStore, db: str) -> None:
    store.create(LUNS, lun("a", "1", volume="v"))
    with SqliteStore(db, readonly=True) as ro:
        assert [v.value.key for v in ro.list(LUNS)] == ["a:1"]
        watch = ro.watch(LUNS, timeout=30)
        store.create(LUNS, lun("a", "2"))
        assert ro.get(LUNS, "a:2") is not None
        assert [v.value.key for v in ro.find(LUNS, index="volume", value="v")] == ["a:1"]
        assert next(watch).key == "a:2"
        with pytest.raises(errors.PreconditionFailed):
            ro.create(LUNS, lun("a", "3"))
        with pytest.raises(errors.PreconditionFailed):
            ro.delete(LUNS, "a:1")
    assert store.get(LUNS, "a:3") is None and store.get(LUNS, "a:1") is not None


def test_readonly_before_any_writer(tmp_path: Path) -> None:
    with pytest.raises(errors.BackendUnavailable):
        SqliteStore(str(tmp_path / "nothing.db"), readonly=True)
    assert not (tmp_path / "nothing.db").exists()


# -- several processes ------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from csi_virtvol.model.array import Lun
    from csi_virtvol.store.base import LUNS
    from csi_virtvol.store.sqlite import SqliteStore

    path, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SqliteStore(path)
    rev = None
    counter_key = prefix + ":counter"
    i = 0
    while count == 0 or i < count:
        store.create(LUNS, Lun(array=prefix, id=str(i), size=i + 1, address="/x/" + str(i)))
        if rev is None:
            rev = store.create(LUNS, Lun(array=prefix, id="counter", size=i + 1, address="/c"))
        else:
            rev = store.update(LUNS, Lun(array=prefix, id="counter", size=i + 1, address="/c"),
                               revision=rev)
        print(i, rev, flush=True)  # acknowledged: both writes committed
        i += 1
    store.close()
""")

INCREMENTER = textwrap.dedent("""
    import dataclasses, sys
    from csi_virtvol import errors
    from csi_virtvol.model.array import Lun
    from csi_virtvol.store.base import LUNS
    from csi_virtvol.store.sqlite import SqliteStore

    path, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SqliteStore(path)
    conflicts = 0
    for i in range(count):
        store.create(LUNS, Lun(array=prefix, id=str(i), size=1, address="/x"))
        while True:
            cur = store.get(LUNS, "shared:counter")
            try:
                store.update(LUNS, dataclasses.replace(cur.value, size=cur.value.size + 1),
                             revision=cur.revision)
                break
            except errors.Conflict:
                conflicts += 1
    print("conflicts", conflicts, flush=True)
    store.close()
""")


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_sigkill_mid_stream_loses_no_acknowledged_write(db: str, procs: list[subprocess.Popen[str]]) -> None:
    SqliteStore(db).close()
    for round_ in range(3):  # each round kills at a different point of a write
        prefix = f"w{round_}"
        p = spawn(WRITER, db, prefix, "0")
        procs.append(p)
        assert p.stdout is not None
        acked: list[tuple[int, str]] = []
        while len(acked) < 150 + 37 * round_:
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else ""
            seq, rev = line.split()
            acked.append((int(seq), rev))
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        assert p.returncode == -signal.SIGKILL
        for line in out.splitlines():  # flushed before the kill: acknowledged too
            seq, rev = line.split()
            acked.append((int(seq), rev))

        conn = raw(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
        with SqliteStore(db) as s:
            found = {v.value.id for v in s.find(LUNS, index="array", value=prefix)}
            for n, _ in acked:
                assert str(n) in found, f"acknowledged write {prefix}:{n} lost"
            last_i, last_rev = acked[-1]
            counter = s.get(LUNS, f"{prefix}:counter")
            assert counter is not None
            # The counter is at the last acknowledged value, or one unacknowledged step past it.
            assert counter.value.size in (last_i + 1, last_i + 2)
            assert int(counter.revision) >= int(last_rev)
            # The file is writable again, and revisions keep going forward.
            assert int(s.create(LUNS, lun(prefix, "after"))) > int(counter.revision)


def test_two_processes_share_one_file(db: str, procs: list[subprocess.Popen[str]]) -> None:
    count = 60
    with SqliteStore(db) as s:
        s.create(LUNS, Lun(array=ArrayId("shared"), id=LunId("counter"), size=0, address="/c"))
        watch = s.watch(LUNS, timeout=60)
        procs += [spawn(INCREMENTER, db, "p1", str(count)), spawn(INCREMENTER, db, "p2", str(count))]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert out.startswith("conflicts ")
        counter = s.get(LUNS, "shared:counter")
        assert counter is not None and counter.value.size == 2 * count
        for prefix in ("p1", "p2"):
            assert sorted(int(v.value.id) for v in s.find(LUNS, index="array", value=prefix)) \
                == list(range(count))
        # This process's watch saw the other processes' writes, in revision order.
        changes = []
        for change in watch:
            changes.append(change)
            if len(changes) == 4 * count:
                break
        assert [int(c.revision) for c in changes] == sorted(int(c.revision) for c in changes)
        sizes = [c.value.size for c in changes if c.key == "shared:counter" and c.value is not None]
        assert sizes == list(range(1, 2 * count + 1))



# -- group commit and apply ---------------------------------------------------------

def test_apply_is_all_or_nothing(store: SqliteStore) -> None:
    from csi_virtvol.store.base import Put

    store.create(LUNS, lun("a", "taken"))
    with pytest.raises(errors.Conflict):
        store.apply([Put(table=LUNS, record=lun("a", "before")), Put(table=LUNS, record=lun("a", "taken"))])
    assert store.get(LUNS, "a:before") is None


def test_concurrent_writes_share_commits_and_keep_their_own_errors(store: SqliteStore, db: str) -> None:
    """Writes that queue while a commit waits go out together in the next one; a write that
    conflicts inside the group fails alone, the others in its group are durable."""
    import threading

    commits = [0]
    real_commit = store._commit

    def counting(group: Any) -> None:
        commits[0] += 1
        real_commit(group)

    store._commit = counting  # type: ignore[method-assign]
    rev = store.create(LUNS, lun("a", "x"))
    commits[0] = 0
    blocker = raw(db)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: commits must wait
    results: dict[int, str] = {}

    def write(i: int) -> None:
        try:
            if i % 4 == 0:  # all of these race for one revision: one wins
                store.update(LUNS, lun("a", "x", volume=f"v{i}"), revision=rev)
            else:
                store.create(LUNS, lun("a", f"n{i}"))
            results[i] = "ok"
        except errors.Conflict:
            results[i] = "conflict"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(store._queue) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)  # the leader is stuck on the lock; the others queue behind it
    blocker.execute("COMMIT")
    blocker.close()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(16))
    assert [i for i, r in results.items() if r == "conflict"] != []
    assert sum(r == "ok" for i, r in results.items() if i % 4 == 0) == 1
    assert all(results[i] == "ok" for i in range(16) if i % 4)
    assert commits[0] <= 3  # 16 writes: the stuck leader's group, then (about) one more
    with SqliteStore(db) as again:  # durable, seen by another opener
        assert {v.value.id for v in again.list(LUNS)} == {"x"} | {f"n{i}" for i in range(16) if i % 4}
