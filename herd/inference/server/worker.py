"""The engine's own thread, and the bridge between it and the server's asyncio event loop.

The Engine is single-threaded: one thread calls add_request/step/abort in a loop. Requests from
the event loop arrive through a locked inbox; each request's TokenEvents go back to its asyncio
queue with call_soon_threadsafe. Cancelling a job (client gone, stop string matched, shutdown)
aborts it in the engine before the next step, so its KV blocks return at once. A torch forward
releases the GIL, so the event loop keeps serving HTTP while the engine computes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from herd.inference.engine import Engine, TokenEvent
from herd.inference.sampling import SamplingParams, TokenConstraint


@dataclass(eq=False)
class Job:
    """One engine request as the server sees it. It puts (job, event list) on its queue for every
    step that produced its token, then (job, None) when it ended, or (job, exception) on failure.
    The jobs of one HTTP request (n choices, several prompts) share one queue."""

    prompt: list[int]
    params: SamplingParams
    constraint: TokenConstraint | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tag: Any = None  # the caller's label (its choice index)
    rid: int | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self, item))


class Metrics:
    """Counters for /metrics (updated on the engine thread, read on the event loop: plain ints/floats)."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_n = 0
        self.steps = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s

    def observe_ttft(self, seconds: float) -> None:
        i = next((j for j, b in enumerate(self.TTFT_BUCKETS) if seconds <= b), len(self.TTFT_BUCKETS))
        self.ttft_counts[i] += 1
        self.ttft_sum += seconds
        self.ttft_n += 1

    def observe_step(self, tokens: int) -> None:
        t = time.monotonic()
        self.steps += 1
        self.generation_tokens += tokens
        self._recent.append((t, tokens))
        while self._recent and self._recent[0][0] < t - 10.0:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 s."""
        t = time.monotonic()
        recent = [(s, n) for s, n in list(self._recent) if s >= t - 10.0]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(t - recent[0][0], 1e-3) if len(recent) > 1 else 0.0


class EngineWorker:
    """Runs an Engine on a background thread and hands its tokens to asyncio jobs."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()
        self._inbox: list[Job] = []
        self._cancels: list[Job] = []
        self._jobs: dict[int, Job] = {}
        self._stopping = False
        self.inflight = 0  # jobs submitted and not yet ended (read by the admission limit)
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, constraint: TokenConstraint | None,
               queue: asyncio.Queue, tag: Any = None) -> Job:
        """Queue a checked request (call engine.check_request first); its events arrive on `queue`."""
        job = Job(prompt, params, constraint, asyncio.get_running_loop(), queue, tag)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self.inflight += 1
            self._inbox.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (client disconnected, stop string seen): its KV blocks are freed before the next step."""
        with self._cv:
            if job.cancelled:
                return
            job.cancelled = True
            self._cancels.append(job)
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is still running and end the thread."""
        with self._cv:
            self._stopping = True
            for job in list(self._jobs.values()) + self._inbox:
                job.cancelled = True
                self._cancels.append(job)
            self._cv.notify()
        self._thread.join(timeout)

    def idle(self) -> bool:
        return self.inflight == 0

    # -- the engine thread ---------------------------------------------------------------------

    def _end(self, job: Job, item: Any = None) -> None:
        if job.rid is not None:
            self._jobs.pop(job.rid, None)
        job.put(item)
        with self._cv:
            self.inflight -= 1

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._cancels or self.engine.has_work() or self._stopping):
                    self._cv.wait()
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                stopping = self._stopping
            for job in cancels:
                if job.rid is not None and job.rid in self._jobs:
                    self.engine.abort(job.rid)
                    self._end(job)
            for job in inbox:
                if job.cancelled:
                    self._end(job)
                    continue
                try:
                    job.rid = self.engine.add_request(job.prompt, job.params, job.constraint)
                except Exception as e:  # checked before submit; anything here is a bug worth reporting
                    self._end(job, e)
                    continue
                self._jobs[job.rid] = job
                self.metrics.prompt_tokens += len(job.prompt)
            if stopping and not self.engine.has_work() and not self._jobs:
                return
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # keep serving: fail the running requests, free the cache
                self.error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                for rid, job in list(self._jobs.items()):
                    self.engine.abort(rid)
                    self._end(job, RuntimeError(f"the engine failed on this batch ({self.error})"))
                continue
            self._deliver(events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        by_job: dict[int, list[TokenEvent]] = {}
        for e in events:
            by_job.setdefault(e.index, []).append(e)
        self.metrics.observe_step(len(events))
        t = time.perf_counter()
        for rid, evs in by_job.items():
            job = self._jobs.get(rid)
            if job is None:
                continue
            if job.first_token is None:
                job.first_token = t
                self.metrics.observe_ttft(t - job.submitted)
            job.put(evs)
            last = evs[-1].finish_reason
            if last is not None:
                self.metrics.finished[last] = self.metrics.finished.get(last, 0) + 1
                self._end(job)

