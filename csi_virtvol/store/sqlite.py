"""The embedded StateStore: one SQLite file, stdlib sqlite3 only.

Layout (schema version 1):

* ``records(tbl, key, rev, body)``: one row per record, the body is the
  model's codec dict as JSON.
* ``idx(tbl, name, value, key)``: the Table's secondary indexes, computed by
  the Table's index functions at write time.  The names each table was last
  indexed with are kept in ``meta``; a writer that knows a different set
  rebuilds that table's rows first, so adding an index needs no migration.
* ``changes(seq, tbl, key, kind, body)``: the change log that `watch` polls.
  ``seq`` is AUTOINCREMENT, so it never goes back even when the log is
  trimmed; it doubles as the store-wide revision (like resourceVersion).  The
  log keeps the last `log_retention` entries; a watcher that falls further
  behind gets Conflict and must list again.
* ``meta(name, value)``: ``schema_version``, ``log_floor`` (highest trimmed
  seq) and ``indexes:<table>``.

Every call is one transaction (writes take ``BEGIN IMMEDIATE`` so two
writers never deadlock on a lock upgrade).  The file runs in WAL mode with
``synchronous=FULL``: an acknowledged write survives a crash of the process
or the machine.  Several processes may share the file; a process may open it
read-only (``readonly=True``), which needs a writer to have created it.

Writes are *group-committed*: the writes that threads of one process issue
while a commit is in flight queue up, and the next thread to commit runs all
of them in one transaction, each inside its own SAVEPOINT (so one write's
Conflict undoes only that write), then one COMMIT, i.e. one fsync of the WAL
for the whole group.  No call returns before the COMMIT holding its write is
durable, so the guarantee above is unchanged; what changes is that sixteen
concurrent callers pay for about one fsync, not sixteen in a row.  `apply`
puts several writes of one call into one SAVEPOINT: all or none.

Connections are pooled: a call borrows an idle connection or opens one, so
the store is safe to share between the threads of the gRPC server.
"""
from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from csi_virtvol import errors
from csi_virtvol.model import codec
from csi_virtvol.model.ids import Revision
from csi_virtvol.store.base import Change, Put, Remove, Table, Versioned, Write

T = TypeVar("T")

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Statements that take the schema from version N-1 to N.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        "CREATE TABLE records(tbl TEXT NOT NULL, key TEXT NOT NULL, rev INTEGER NOT NULL,"
        " body TEXT NOT NULL, PRIMARY KEY (tbl, key)) WITHOUT ROWID",
        "CREATE TABLE idx(tbl TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,"
        " key TEXT NOT NULL, PRIMARY KEY (tbl, name, value, key)) WITHOUT ROWID",
        "CREATE INDEX idx_by_key ON idx(tbl, key)",
        "CREATE TABLE changes(seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL,"
        " key TEXT NOT NULL, kind TEXT NOT NULL, body TEXT)",
        "CREATE INDEX changes_by_tbl ON changes(tbl, seq)",
        "INSERT INTO meta(name, value) VALUES ('log_floor', '0')",
    ),
}

_TRIM_EVERY = 64      # trim the change log when seq is a multiple of this
_WATCH_BATCH = 256    # change rows read per poll
_GROUP_MAX = 256      # writes per group commit at most
_DECODE_CACHE = 50_000  # decoded records kept (about 2 KiB each)


class _Pending:
    """One caller's write waiting for a group commit."""

    __slots__ = ("fn", "done", "lead", "result", "error")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.lead = False          # woken to run the next group, not because it is done
        self.result: Any = None
        self.error: BaseException | None = None


class SqliteStore:
    """A StateStore in one SQLite file at `path` (created unless readonly)."""

    def __init__(
        self,
        path: str,
        *,
        readonly: bool = False,
        busy_timeout: float = 30.0,
        poll_interval: float = 0.05,
        log_retention: int = 10_000,
    ) -> None:
        if log_retention < _TRIM_EVERY:
            raise errors.InvalidRequest(f"log_retention must be at least {_TRIM_EVERY}")
        self._path = path
        self._readonly = readonly
        self._busy_timeout = busy_timeout
        self._poll_interval = poll_interval
        self._log_retention = log_retention
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self._wlock = threading.Lock()     # guards _queue and _committing
        self._queue: list[_Pending] = []
        self._committing = False
        self._decodes: dict[tuple[str, str], tuple[int, Versioned[Any]]] = {}
        self._indexed: set[str] = set()    # tables whose index rows match their Table (committed)
        self._checked: set[str] = set()    # ... found so by the group being committed
        if readonly and not os.path.exists(path):
            raise errors.BackendUnavailable(f"state store {path} does not exist yet")
        self._open()

    # -- lifecycle ---------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def readonly(self) -> bool:
        return self._readonly

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            if self._readonly:
                uri = "file:" + urllib.parse.quote(os.path.abspath(self._path)) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout,
                                       isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(self._path, timeout=self._busy_timeout,
                                       isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                if not self._readonly:
                    conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as e:
            raise _wrap(e, f"cannot open state store {self._path}") from e
        return conn

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise errors.BackendUnavailable(f"state store {self._path} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # an aborted call must not leave a lock behind
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        finally:
            with self._lock:
                keep = not self._closed and not conn.in_transaction
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextlib.contextmanager
    def _txn(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; sqlite3 errors come out as domain errors."""
        if write and self._readonly:
            raise errors.PreconditionFailed(f"state store {self._path} is open read-only")
        with self._conn() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise _wrap(e, f"state store {self._path}") from e

    def _open(self) -> None:
        if not self._readonly:
            with self._conn() as conn:
                try:
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                except sqlite3.Error as e:
                    raise _wrap(e, f"cannot switch {self._path} to WAL") from e
                if str(mode).lower() != "wal":
                    raise errors.BackendError(f"state store {self._path}: journal mode {mode}, not wal")
        with self._txn(write=not self._readonly) as conn:
            version = _schema_version(conn)
            if version > SCHEMA_VERSION:
                raise errors.BackendError(
                    f"state store {self._path} has schema version {version};"
                    f" this driver knows up to {SCHEMA_VERSION}")
            if version == SCHEMA_VERSION:
                return
            if self._readonly:
                raise errors.BackendUnavailable(
                    f"state store {self._path} has schema version {version}, needs"
                    f" {SCHEMA_VERSION}; a writer must open it first")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                logger.info("migrating state store %s to schema version %d", self._path, v)
                for stmt in _MIGRATIONS[v]:
                    conn.execute(stmt)
            conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    # -- reads -------------------------------------------------------------

    def _read1(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A connection for a read of one statement: atomic by itself in autocommit mode, so
        it needs no BEGIN/COMMIT around it (a third of the cost of a small read)."""
        return self._conn()

    def get(self, table: Table[T], key: str) -> Versioned[T] | None:
        with self._read1() as conn, _wrapped(self._path):
            row = conn.execute("SELECT rev, body FROM records WHERE tbl = ? AND key = ?",
                               (table.name, key)).fetchone()
        return None if row is None else self._decoded(table, key, row[0], row[1])

    def find(self, table: Table[T], *, index: str, value: str) -> list[Versioned[T]]:
        func = table.indexes.get(index)
        if func is None:
            raise errors.InvalidRequest(f"table {table.name} has no index {index!r}")
        with self._txn(write=False) as conn:
            if index in _indexed_names(conn, table.name):
                rows = conn.execute(
                    "SELECT r.key, r.rev, r.body FROM idx i JOIN records r ON r.tbl = i.tbl AND r.key = i.key"
                    " WHERE i.tbl = ? AND i.name = ? AND i.value = ? ORDER BY i.key",
                    (table.name, index, value)).fetchall()
                return [self._decoded(table, key, rev, body) for key, rev, body in rows]
            # Not materialised yet (a read-only opener, or no write since the
            # index was added): scan.
            rows = conn.execute("SELECT rev, body FROM records WHERE tbl = ? ORDER BY key",
                                (table.name,)).fetchall()
        found = [_versioned(table, rev, body) for rev, body in rows]
        return [v for v in found if func(v.value) == value]

    def list(self, table: Table[T], *, after: str = "", limit: int = 0) -> list[Versioned[T]]:
        if limit < 0:
            raise errors.InvalidRequest(f"limit must not be negative: {limit}")
        with self._read1() as conn, _wrapped(self._path):
            rows = conn.execute(
                "SELECT key, rev, body FROM records WHERE tbl = ? AND key > ? ORDER BY key LIMIT ?",
                (table.name, after, limit or -1)).fetchall()
        return [self._decoded(table, key, rev, body) for key, rev, body in rows]

    def _decoded(self, table: Table[T], key: str, rev: int, body: str) -> Versioned[T]:
        """The record decoded, reusing the last decoding of the same revision (records are
        frozen dataclasses): a list of 10,000 unchanged records decodes none of them."""
        hit = self._decodes.get((table.name, key))
        if hit is not None and hit[0] == rev:
            return cast("Versioned[T]", hit[1])
        v = _versioned(table, rev, body)
        if len(self._decodes) >= _DECODE_CACHE:
            self._decodes.clear()
        self._decodes[(table.name, key)] = (rev, v)
        return v

    # -- writes ------------------------------------------------------------

    def create(self, table: Table[T], record: T) -> Revision:
        key, body = table.key(record), _encode(record)
        return Revision(str(self._write(lambda conn: self._create(conn, table, key, record, body))))

    def update(self, table: Table[T], record: T, *, revision: Revision) -> Revision:
        key, body = table.key(record), _encode(record)
        want = _parse_revision(table, key, revision)
        return Revision(str(self._write(lambda conn: self._update(conn, table, key, record, body, want))))

    def delete(self, table: Table[T], key: str, *, revision: Revision | None = None) -> None:
        want = None if revision is None else _parse_revision(table, key, revision)
        self._write(lambda conn: self._delete(conn, table, key, want))

    def apply(self, writes: Sequence[Write]) -> builtins.list[Revision | None]:
        """All the writes or none, in one transaction (and one fsync)."""
        steps = [self._step(w) for w in writes]
        if not steps:
            return []
        seqs: builtins.list[int | None] = self._write(lambda conn: [step(conn) for step in steps])
        return [None if q is None else Revision(str(q)) for q in seqs]

    def _step(self, w: Write) -> Callable[[sqlite3.Connection], int | None]:
        """One write of `apply`, checked now, run later inside the transaction."""
        if isinstance(w, Put):
            table: Table[Any] = w.table
            record, key = w.record, w.table.key(w.record)
            body = _encode(record)
            if w.revision is None:
                return lambda conn: self._create(conn, table, key, record, body)
            want = _parse_revision(table, key, w.revision)
            return lambda conn: self._update(conn, table, key, record, body, want)
        if isinstance(w, Remove):
            rtable: Table[Any] = w.table
            rkey = w.key
            rwant = None if w.revision is None else _parse_revision(rtable, rkey, w.revision)
            return lambda conn: self._delete(conn, rtable, rkey, rwant)
        raise errors.InvalidRequest(f"not a store write: {w!r}")

    def _create(self, conn: sqlite3.Connection, table: Table[T], key: str, record: T, body: str) -> int:
        self._sync_indexes(conn, table)
        if conn.execute("SELECT 1 FROM records WHERE tbl = ? AND key = ?",
                        (table.name, key)).fetchone() is not None:
            raise errors.Conflict(f"{table.name}/{key} already exists")
        seq = self._log(conn, table.name, key, "put", body)
        conn.execute("INSERT INTO records(tbl, key, rev, body) VALUES (?, ?, ?, ?)",
                     (table.name, key, seq, body))
        _write_index(conn, table, key, record)
        return seq

    def _update(self, conn: sqlite3.Connection, table: Table[T], key: str, record: T, body: str,
                want: int) -> int:
        self._sync_indexes(conn, table)
        row = conn.execute("SELECT rev FROM records WHERE tbl = ? AND key = ?",
                           (table.name, key)).fetchone()
        if row is None:
            raise errors.NotFound(f"{table.name}/{key} does not exist")
        if row[0] != want:
            raise errors.Conflict(f"{table.name}/{key}: revision {want} is stale (now {row[0]})")
        seq = self._log(conn, table.name, key, "put", body)
        conn.execute("UPDATE records SET rev = ?, body = ? WHERE tbl = ? AND key = ?",
                     (seq, body, table.name, key))
        conn.execute("DELETE FROM idx WHERE tbl = ? AND key = ?", (table.name, key))
        _write_index(conn, table, key, record)
        return seq

    def _delete(self, conn: sqlite3.Connection, table: Table[T], key: str, want: int | None) -> None:
        row = conn.execute("SELECT rev FROM records WHERE tbl = ? AND key = ?",
                           (table.name, key)).fetchone()
        if row is None:
            return
        if want is not None and row[0] != want:
            raise errors.Conflict(f"{table.name}/{key}: revision {want} is stale (now {row[0]})")
        self._log(conn, table.name, key, "delete", None)
        conn.execute("DELETE FROM records WHERE tbl = ? AND key = ?", (table.name, key))
        conn.execute("DELETE FROM idx WHERE tbl = ? AND key = ?", (table.name, key))

    # -- group commit --------------------------------------------------------

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `fn` in a write transaction, shared with the writes queued meanwhile."""
        if self._readonly:
            raise errors.PreconditionFailed(f"state store {self._path} is open read-only")
        me = _Pending(fn)
        with self._wlock:
            self._queue.append(me)
            lead = not self._committing
            if lead:
                self._committing = True
        while not lead:
            me.done.wait()
            if not me.lead:
                break
            me.lead, lead = False, True
            me.done.clear()
        if lead:
            self._lead()
        if me.error is not None:
            raise me.error
        return me.result

    def _lead(self) -> None:
        """Commit the queued writes as one group, then hand the next group to its first waiter."""
        with self._wlock:
            group, self._queue = self._queue[:_GROUP_MAX], self._queue[_GROUP_MAX:]
        try:
            self._commit(group)
        finally:
            with self._wlock:
                if self._queue:
                    nxt = self._queue[0]
                    nxt.lead = True
                    nxt.done.set()
                else:
                    self._committing = False

    def _commit(self, group: builtins.list[_Pending]) -> None:
        self._checked = set()
        try:
            with self._conn() as conn:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    for p in group:
                        conn.execute("SAVEPOINT w")
                        try:
                            p.result = p.fn(conn)
                        except sqlite3.Error:
                            raise  # the transaction itself is in trouble: fail the group
                        except BaseException as e:  # this write's own error (Conflict, ...): undo it alone
                            conn.execute("ROLLBACK TO w")
                            p.error = e
                        conn.execute("RELEASE w")
                    conn.execute("COMMIT")
                except sqlite3.Error as e:
                    raise _wrap(e, f"state store {self._path}") from e
            self._indexed |= self._checked
        except BaseException as e:
            for p in group:
                if p.error is None:
                    p.error, p.result = e, None
        finally:
            for p in group:
                p.done.set()

    def _log(self, conn: sqlite3.Connection, tbl: str, key: str, kind: str, body: str | None) -> int:
        cur = conn.execute("INSERT INTO changes(tbl, key, kind, body) VALUES (?, ?, ?, ?)",
                           (tbl, key, kind, body))
        seq = cur.lastrowid
        assert seq is not None
        if seq % _TRIM_EVERY == 0 and seq > self._log_retention:
            floor = seq - self._log_retention
            conn.execute("DELETE FROM changes WHERE seq <= ?", (floor,))
            conn.execute("UPDATE meta SET value = ? WHERE name = 'log_floor' AND CAST(value AS INTEGER) < ?",
                         (str(floor), floor))
        return seq

    def _sync_indexes(self, conn: sqlite3.Connection, table: Table[T]) -> None:
        """Rebuild the table's index rows if they were built for other index names."""
        if table.name in self._indexed:
            return  # checked (or rebuilt) by this process already
        names = sorted(table.indexes)
        if _indexed_names(conn, table.name) == names:
            self._checked.add(table.name)  # remembered once this transaction commits
            return
        logger.info("state store %s: indexing table %s by %s", self._path, table.name, names)
        conn.execute("DELETE FROM idx WHERE tbl = ?", (table.name,))
        for key, body in conn.execute("SELECT key, body FROM records WHERE tbl = ?",
                                      (table.name,)).fetchall():
            _write_index(conn, table, key, codec.from_dict(table.type, json.loads(body)))
        conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)",
                     (f"indexes:{table.name}", json.dumps(names)))

    # -- watch -------------------------------------------------------------

    def watch(self, table: Table[T], *, timeout: float) -> Iterator[Change[T]]:
        """Changes committed after this call returns its iterator, until `timeout`.

        The starting point is taken now, not at the first `next()`.  Raises
        Conflict (while iterating) if the change log was trimmed past the
        watcher's position: list again and start a new watch.
        """
        with self._txn(write=False) as conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        start = 0 if row is None else int(row[0])
        return self._watch(table, start, time.monotonic() + timeout)

    def _watch(self, table: Table[T], cursor: int, deadline: float) -> Iterator[Change[T]]:
        while True:
            with self._txn(write=False) as conn:
                floor = int(conn.execute("SELECT value FROM meta WHERE name = 'log_floor'").fetchone()[0])
                if cursor < floor:
                    raise errors.Conflict(
                        f"watch on {table.name} fell behind the change log (at {cursor},"
                        f" log starts after {floor}); list again")
                rows = conn.execute(
                    "SELECT seq, kind, key, body FROM changes WHERE tbl = ? AND seq > ?"
                    " ORDER BY seq LIMIT ?", (table.name, cursor, _WATCH_BATCH)).fetchall()
            for seq, kind, key, body in rows:
                cursor = seq
                value = None if body is None else codec.from_dict(table.type, json.loads(body))
                yield Change(kind=kind, key=key, value=value, revision=Revision(str(seq)))
            if len(rows) == _WATCH_BATCH:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(self._poll_interval, left))


@contextlib.contextmanager
def _wrapped(path: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise _wrap(e, f"state store {path}") from e


def _wrap(e: sqlite3.Error, what: str) -> errors.VirtvolError:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return errors.BackendUnavailable(f"{what}: busy: {e}")
    return errors.BackendError(f"{what}: {e}")


def _schema_version(conn: sqlite3.Connection) -> int:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _indexed_names(conn: sqlite3.Connection, tbl: str) -> list[str]:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (f"indexes:{tbl}",)).fetchone()
    if row is None:
        return []
    names: list[str] = json.loads(row[0])
    return names


def _write_index(conn: sqlite3.Connection, table: Table[T], key: str, record: T) -> None:
    conn.executemany("INSERT INTO idx(tbl, name, value, key) VALUES (?, ?, ?, ?)",
                     [(table.name, name, func(record), key) for name, func in table.indexes.items()])


def _encode(record: Any) -> str:
    return json.dumps(codec.to_dict(record), sort_keys=True, separators=(",", ":"))


def _versioned(table: Table[T], rev: int, body: str) -> Versioned[T]:
    return Versioned(value=codec.from_dict(table.type, json.loads(body)), revision=Revision(str(rev)))


def _parse_revision(table: Table[T], key: str, revision: Revision) -> int:
    try:
        return int(revision)
    except (TypeError, ValueError) as e:  # not one of ours: it cannot be current
        raise errors.Conflict(f"{table.name}/{key}: revision {revision!r} is not a revision of this store") from e
