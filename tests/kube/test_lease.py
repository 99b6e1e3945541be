"""Leader election on a Lease served by the fake API server."""
from __future__ import annotations

import threading
from typing import Any

import pytest

from csi_virtvol import errors
from csi_virtvol.kube.lease import LeaderElector

from fakeapi import FakeApiServer

NS, NAME = "kube-system", "virtvol-csi-example-org"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def elector(client: Any, ident: str, clock: Clock | None = None, **kw: Any) -> LeaderElector:
    return LeaderElector(client, namespace=NS, name=NAME, identity=ident, lease_duration=15,
                         renew_deadline=10, retry_period=2, clock=clock or Clock(), **kw)


def holder(api: FakeApiServer) -> str | None:
    lease = api.find("coordination.k8s.io", "leases", NAME, NS)
    assert lease is not None
    return lease["spec"].get("holderIdentity")


@pytest.mark.parametrize("rounds", [8])
def test_racing_candidates_one_leader(fake_api: FakeApiServer, client: Any, rounds: int) -> None:
    """Each round: every candidate tries at once (the first round creates the Lease)."""
    clocks = [Clock() for _ in range(4)]
    cands = [elector(client, f"c{i}", clocks[i]) for i in range(4)]
    for rnd in range(rounds):
        barrier = threading.Barrier(len(cands))
        won: list[str] = []
        lock = threading.Lock()

        def go(c: LeaderElector, b: threading.Barrier = barrier, won: list[str] = won) -> None:
            b.wait()
            if c.try_acquire_or_renew():
                with lock:
                    won.append(c.identity)

        ts = [threading.Thread(target=go, args=(c,)) for c in cands]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(won) == 1, won
        assert holder(fake_api) == won[0]
        # the leader gives up every other round, so that the next race is for a free Lease
        if rnd % 2:
            assert next(c for c in cands if c.identity == won[0]).release()
            assert holder(fake_api) is None


def test_renew_keeps_and_others_wait(fake_api: FakeApiServer, client: Any) -> None:
    a, b = elector(client, "a"), elector(client, "b")
    assert a.try_acquire_or_renew() and a.is_leader
    rv1 = fake_api.find("coordination.k8s.io", "leases", NAME, NS)["metadata"]["resourceVersion"]  # type: ignore[index]
    assert not b.try_acquire_or_renew() and not b.is_leader
    assert a.try_acquire_or_renew()
    lease = fake_api.find("coordination.k8s.io", "leases", NAME, NS)
    assert lease is not None and lease["metadata"]["resourceVersion"] != rv1
    assert lease["spec"]["holderIdentity"] == "a" and lease["spec"]["leaseTransitions"] == 0
    assert lease["spec"]["leaseDurationSeconds"] == 15


def test_takeover_after_expiry(fake_api: FakeApiServer, client: Any) -> None:
    clock_b = Clock()
    a, b = elector(client, "a"), elector(client, "b", clock_b)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()   # b starts observing a's record now
    clock_b.t += 14.0
    assert not b.try_acquire_or_renew()   # not yet expired on b's clock
    assert a.try_acquire_or_renew()       # a renews: the record changes
    clock_b.t += 14.0
    assert not b.try_acquire_or_renew()   # b saw a new renewTime 0 s ago
    clock_b.t += 15.5                     # a stopped renewing
    assert b.try_acquire_or_renew()
    lease = fake_api.find("coordination.k8s.io", "leases", NAME, NS)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew() or holder(fake_api) == "b"


def test_release_hands_over_at_once(fake_api: FakeApiServer, client: Any) -> None:
    a, b = elector(client, "a"), elector(client, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert a.release() and not a.is_leader
    assert not a.release()  # no longer ours
    assert b.try_acquire_or_renew()
    assert holder(fake_api) == "b"


def test_run_loop_leads_and_releases(fake_api: FakeApiServer, client: Any) -> None:
    a = LeaderElector(client, namespace=NS, name=NAME, identity="a", lease_duration=3, renew_deadline=2,
                      retry_period=0.05)
    stop = threading.Event()
    events: list[str] = []
    started = threading.Event()

    def on_start() -> None:
        events.append("start")
        started.set()

    t = threading.Thread(target=a.run, kwargs=dict(on_started_leading=on_start,
                                                   on_stopped_leading=lambda: events.append("stop"),
                                                   stop=stop))
    t.start()
    assert started.wait(30)
    assert holder(fake_api) == "a"
    stop.set()
    t.join(30)
    assert events == ["start", "stop"]
    assert holder(fake_api) is None


def test_bad_settings_are_refused(client: Any) -> None:
    with pytest.raises(errors.InvalidRequest):
        LeaderElector(client, namespace=NS, name=NAME, identity="a", lease_duration=5, renew_deadline=10)
    with pytest.raises(errors.InvalidRequest):
        LeaderElector(client, namespace=NS, name=NAME, identity="")
