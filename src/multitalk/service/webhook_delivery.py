"""The webhook dispatcher: sends the store's outbox, off the GPU worker's thread.

When a job ends, the store writes a row into its ``webhooks`` outbox in the same transaction as
the job's terminal status (``store.py``). Every service process (API and workers) runs one
:class:`WebhookDispatcher`: a thread with an asyncio loop that leases due rows (several processes
never send the same row at once), POSTs them concurrently (``webhook_concurrency`` at a time) and
records each attempt on the row and on the job (``webhook``: state, attempts, status code, error,
next attempt). So:

* a slow receiver never delays a job: the GPU worker only writes the outbox row;
* one attempt has a total deadline (``webhook_timeout_s``) over connect, send and the response's
  status line; the response body is never read (a receiver that drips it cannot hold a slot);
* failed attempts are retried ``webhook_retries`` times with exponential backoff and jitter
  (tenacity's ``wait_exponential_jitter`` / ``stop_after_attempt``), each retry a due time in
  the database, so a retry pending when the process dies is sent by the next one to start;
* a 2xx is delivered; anything else (3xx included: redirects are not followed) is retried; an
  address refused by the outbound policy is given up at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid

import httpx
import tenacity

from multitalk.errors import UserInputError

from . import webhooks
from .config import ServiceConfig
from .links import download_url
from .metrics import Metrics
from .outbound import AsyncPinnedTransport, vet
from .schemas import job_document
from .storage import Storage
from .store import JobStore, StoreUnavailable

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 5.0      # a row leased by a process that died is due again after 2 deadlines + this


class WebhookDispatcher:
    def __init__(self, store: JobStore, storage: Storage, config: ServiceConfig, *,
                 metrics: Metrics | None = None, dispatcher_id: str | None = None):
        self.store, self.storage, self.config = store, storage, config
        self.metrics = metrics
        self.id = dispatcher_id or \
            f"hooks:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wait = tenacity.wait_exponential_jitter(initial=config.webhook_backoff_s,
                                                      max=config.webhook_max_backoff_s,
                                                      jitter=config.webhook_backoff_s)
        self._give_up = tenacity.stop_after_attempt(config.webhook_retries + 1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                            name="multitalk-webhooks", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10) -> None:
        self._stop.set()
        self.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """Look at the outbox now (a job of this process just ended)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:      # the loop already closed
                pass

    def retry_in(self, attempts: int) -> float | None:
        """Seconds until the next attempt after ``attempts`` failed ones; None: give up."""
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = attempts
        if self._give_up(state):
            return None
        return float(self._wait(state))

    # -- the loop ----------------------------------------------------------------------------
    async def _main(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        in_flight: set[asyncio.Task] = set()
        lease_s = 2 * self.config.webhook_timeout_s + LEASE_MARGIN_S
        outage = False
        while not self._stop.is_set():
            self._wake.clear()          # a notify() from here on wakes the wait below
            free = self.config.webhook_concurrency - len(in_flight)
            wait_s = self.config.poll_interval_s
            if free > 0:
                due = []
                try:
                    next_due = await asyncio.to_thread(self.store.next_webhook_due)
                    if next_due is not None and next_due <= time.time():
                        due = await asyncio.to_thread(self.store.lease_webhooks, self.id,
                                                      lease_s, free)
                    elif next_due is not None:
                        wait_s = min(wait_s, next_due - time.time())
                    if outage:
                        log.info("webhook outbox reachable again")
                        outage = False
                except Exception as e:  # noqa: BLE001 - database away: try again later
                    if not outage:               # once per outage, not once per poll
                        log.warning("webhook outbox unavailable (retrying): %s", e)
                    outage = True
                for entry in due:
                    task = asyncio.create_task(self._deliver(entry))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                if due and len(due) == free:
                    continue            # more may be due: no sleep
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.01, wait_s))
            except TimeoutError:
                pass
        for task in list(in_flight):
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)

    async def _deliver(self, entry: dict) -> None:
        msg_id, url = entry["id"], entry["url"]
        status_code, error, final = None, None, False
        t0 = time.monotonic()
        try:
            data = await asyncio.to_thread(self._body, entry)
            if data is None:
                error, final = "the job no longer exists", True
            else:
                status_code = await self._post(url, msg_id, data)
                if not 200 <= status_code < 300:
                    error = f"HTTP {status_code}"
        except UserInputError as e:
            error, final = str(e), True        # the address itself is refused
        except TimeoutError:
            error = f"no response status within {self.config.webhook_timeout_s:g} s"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - e.g. the store could not build the body
            error = f"{type(e).__name__}: {e}"
        delivered = error is None
        retry_in = None if delivered or final else self.retry_in(entry["attempts"])
        level = logging.INFO if delivered else logging.WARNING
        log.log(level, "webhook %s (%s) to %s attempt %d: %s in %.2fs%s", msg_id, entry["event"],
                url, entry["attempts"], "delivered" if delivered else error,
                time.monotonic() - t0,
                "" if delivered else (f"; retry in {retry_in:.1f}s" if retry_in is not None
                                      else "; giving up"))
        if self.metrics is not None:
            outcome = "delivered" if delivered else ("retry" if retry_in is not None else "failed")
            self.metrics.webhook_attempts.labels(outcome=outcome).inc()
            if outcome == "failed":
                self.metrics.webhook_failures.inc()
        await self._record(msg_id, delivered, status_code, error, retry_in)

    def _body(self, entry: dict) -> bytes | None:
        job = self.store.get(entry["job_id"])
        if job is None:
            return None
        job = dict(job, webhook=None)
        doc = job_document(job, download_url(self.storage, self.config, job))
        return webhooks.body(entry["event"], doc, job["finished_at"] or time.time())

    async def _post(self, url: str, msg_id: str, data: bytes) -> int:
        """One attempt: the status code, within the total deadline; the body is never read.

        The host is resolved once and vetted (``outbound.vet``), and the POST goes to that
        address only (``AsyncPinnedTransport``: DNS rebinding cannot redirect it), with a client
        of its own per attempt."""
        async with asyncio.timeout(self.config.webhook_timeout_s):
            dest = await asyncio.to_thread(vet, "webhook_url", url,
                                           allow_private=self.config.allow_private_urls)
            headers = webhooks.headers(self.config.webhook_secret, msg_id, data)
            async with httpx.AsyncClient(transport=AsyncPinnedTransport(dest), trust_env=False,
                                         follow_redirects=False) as pinned:
                async with pinned.stream("POST", url, content=data, headers=headers,
                                         timeout=self.config.webhook_timeout_s) as response:
                    return response.status_code

    async def _record(self, msg_id: str, delivered: bool, status_code: int | None,
                      error: str | None, retry_in: float | None) -> None:
        for attempt in range(60):                    # ride out a database restart (~1 min)
            try:
                if not await asyncio.to_thread(self.store.webhook_attempted, msg_id, self.id,
                                               delivered=delivered, status_code=status_code,
                                               error=error, retry_in_s=retry_in):
                    log.warning("webhook %s: lease lost before the outcome was recorded", msg_id)
                return
            except StoreUnavailable as e:
                if self._stop.is_set():
                    return
                log.warning("webhook %s: cannot record the outcome yet: %s", msg_id, e)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
