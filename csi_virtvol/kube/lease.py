"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection.

The leader writes its identity into ``spec.holderIdentity`` and refreshes
``spec.renewTime`` every `retry_period`; a candidate takes the Lease over only
when the record it last saw has not changed for ``leaseDurationSeconds`` on
its *own* clock (no comparison of clocks across machines).  Every write is a
PUT with the resourceVersion read just before, so two candidates can never
both win: the loser gets 409.  Releasing clears the holder so that a
successor need not wait for the expiry.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kubernetes.client as k8s
import urllib3.exceptions

from csi_virtvol import errors
from csi_virtvol.kube.crdstore import wrap_api_error

logger = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class LeaderElector:
    """One candidate for the Lease `namespace`/`name`."""

    def __init__(self, api_client: k8s.ApiClient, *, namespace: str, name: str, identity: str,
                 lease_duration: int = 15, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, request_timeout: float = 10.0) -> None:
        if not identity:
            raise errors.InvalidRequest("leader election needs a non-empty identity")
        if not lease_duration > renew_deadline > retry_period > 0:
            raise errors.InvalidRequest("need lease_duration > renew_deadline > retry_period > 0")
        self._api = k8s.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self._clock = clock
        self._timeout = request_timeout
        self._observed: tuple[Any, ...] | None = None   # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0
        self._last_renew = float("-inf")

    # -- one step -------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while our last successful renewal is younger than the renew deadline."""
        return self._clock() - self._last_renew < self.renew_deadline

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if we hold the Lease afterwards."""
        now = _now()
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._timeout)
        except k8s.ApiException as e:
            if e.status != 404:
                raise wrap_api_error(e, f"read lease {self.namespace}/{self.name}") from e
            return self._create(now)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"read lease {self.namespace}/{self.name}") from e
        spec = lease.spec or k8s.V1LeaseSpec()
        seen = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if seen != self._observed:
            self._observed, self._observed_at = seen, self._clock()
        holder = spec.holder_identity or ""
        duration = spec.lease_duration_seconds or self.lease_duration
        if holder and holder != self.identity and self._clock() < self._observed_at + duration:
            return False  # someone else holds an unexpired Lease
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if holder else 0)
            spec.acquire_time = now
            spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.lease_duration
        spec.renew_time = now
        lease.spec = spec
        try:
            self._api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=self._timeout)
        except k8s.ApiException as e:
            if e.status in (404, 409):
                return False  # someone else wrote first
            raise wrap_api_error(e, f"update lease {self.namespace}/{self.name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"update lease {self.namespace}/{self.name}") from e
        self._last_renew = self._clock()
        return True

    def _create(self, now: dt.datetime) -> bool:
        lease = k8s.V1Lease(
            metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=k8s.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_duration,
                                 acquire_time=now, renew_time=now, lease_transitions=0))
        try:
            self._api.create_namespaced_lease(self.namespace, lease, _request_timeout=self._timeout)
        except k8s.ApiException as e:
            if e.status == 409:
                return False
            raise wrap_api_error(e, f"create lease {self.namespace}/{self.name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"create lease {self.namespace}/{self.name}") from e
        self._last_renew = self._clock()
        return True

    def release(self) -> bool:
        """Give the Lease up if we hold it, so that a successor takes over at once."""
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._timeout)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return False
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _now()
            lease.spec.acquire_time = None
            self._api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=self._timeout)
        except k8s.ApiException as e:
            if e.status in (404, 409):
                return False
            raise wrap_api_error(e, f"release lease {self.namespace}/{self.name}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise wrap_api_error(e, f"release lease {self.namespace}/{self.name}") from e
        finally:
            self._last_renew = float("-inf")
        return True

    # -- the loop ---------------------------------------------------------------

    def run(self, *, on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None],
            stop: threading.Event) -> None:
        """Campaign until `stop`; call the callbacks on gaining and losing the lead.

        A leader that cannot renew within `renew_deadline` steps down (calls
        `on_stopped_leading`); on `stop` it releases the Lease.
        """
        leading = False
        try:
            while not stop.is_set():
                try:
                    ok = self.try_acquire_or_renew()
                except errors.VirtvolError as e:
                    logger.warning("lease %s/%s: %s", self.namespace, self.name, e)
                    ok = False
                if ok and not leading:
                    leading = True
                    logger.info("lease %s/%s: %s became leader", self.namespace, self.name, self.identity)
                    on_started_leading()
                elif leading and not self.is_leader:
                    leading = False
                    logger.warning("lease %s/%s: %s lost the lead", self.namespace, self.name, self.identity)
                    on_stopped_leading()
                stop.wait(self.retry_period)
        finally:
            if leading:
                try:
                    self.release()
                except errors.VirtvolError as e:
                    logger.warning("lease %s/%s: release failed: %s", self.namespace, self.name, e)
                on_stopped_leading()
