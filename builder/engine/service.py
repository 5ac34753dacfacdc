"""``EngineService``: the reference engine as a Python object (rank 0 in this process, ranks 1..N-1 as worker
processes), used by ``dsbuild generate/verify``, the Triton CPU model and the benchmarks.

All ranks join one ``torch.distributed.TCPStore`` created here on 127.0.0.1 (port 0: the OS picks) and passed as
``store=`` (docs/upstream-facts.md#U-TDIST-2: mixing with ``init_method=tcp://`` breaks). Workers are started with
``subprocess.Popen([python, "-m", "builder.engine.worker", ...])`` -- never fork -- with ``PR_SET_PDEATHSIG`` so a
killed host never leaves busy orphans, the repository path passed in ``PYTHONPATH`` explicitly (a Triton
python-backend stub runs isolated and its ``sys.executable`` may be wrong: pass ``python_executable=``), and a
long gloo timeout so idle groups survive. One multi-rank service per process at a time (torch.distributed has one
default group per process); a world of one runs in-process without torch.distributed.

Two ways in: :meth:`EngineService.generate`, a batch call that returns when all its requests are done, and
:meth:`EngineService.scheduler`, continuous batching for a server: requests submitted from any thread join the
running batch at the next token boundary and leave it when done or cancelled (:class:`Scheduler`). A request's own
failure (its sampling) fails that request alone; only a failure of the ranks themselves (a dead rank, a broken
collective) makes the service unusable, reported by :attr:`EngineService.broken`.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from builder.engine.bundle import EngineBundle
from builder.engine.distributed import LONG_TIMEOUT, backend_for, make_comm
from builder.engine.driver import Driver
from builder.engine.generate import Engine
from builder.engine.sampling import GenerationRequest, GenerationResult, validate_request
from builder.engine.speculative import SpeculativeOptions
from builder.engine.worker import DTYPES, ready_key
from builder.errors import RequestError, ServeError

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600.0
SHUTTING_DOWN = "the engine service is shutting down; the request was stopped"
CLOSED_BEFORE_RUN = "the engine service closed before this request ran"

__all__ = ["EngineService", "GenerationRequest", "GenerationResult", "Scheduler", "SpeculativeOptions"]


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies (Linux PR_SET_PDEATHSIG = 1)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ServeError(f"compute dtype {dtype} is not supported; use one of {sorted(DTYPES)}")


class EngineService:
    def __init__(self, engine_dir: str | Path, *, device: str = "cpu", threads_per_rank: int | None = None,
                 dtype: torch.dtype = torch.float32, python_executable: str | None = None,
                 absorb_mla: bool | None = None, start_timeout: float = START_TIMEOUT_S):
        self.bundle = EngineBundle.open(engine_dir)
        self.device = device
        self.world = self.bundle.world_size
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Path] = []
        self._store = None
        self._closed = False
        self._broken: str | None = None  # why the ranks can no longer run collectives together
        self._log_dir = None
        self._lock = threading.Lock()  # one collective at a time (a Triton model may call from several threads)
        self._scheduler: Scheduler | None = None
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // self.world)
        dtype_name = _dtype_name(dtype)
        if self.world > 1:
            if dist.is_initialized():
                raise ServeError("this process already has a torch.distributed group; close the other "
                                 "EngineService first (one multi-rank service per process)")
            torch.set_num_threads(threads)
            self._store = dist.TCPStore("127.0.0.1", 0, self.world, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=start_timeout))
            self._spawn(python_executable or sys.executable, threads, dtype_name, absorb_mla)
        try:
            tensors = self.bundle.load_rank(0, dtype=dtype, device=device)
            if self.world > 1:
                self._wait_ready(start_timeout)
                dist.init_process_group(backend_for(device), store=self._store, rank=0, world_size=self.world,
                                        timeout=LONG_TIMEOUT)
            comm = make_comm(self.bundle.layout, rank=0, device=device)
            self._driver = Driver(Engine(self.bundle, comm, dtype=dtype, absorb_mla=absorb_mla, tensors=tensors))
        except BaseException:
            self._kill_workers()
            raise

    # ----- start-up -----
    def _spawn(self, python: str, threads: int, dtype_name: str, absorb_mla: bool | None) -> None:
        if not python or not Path(python).exists():
            raise ServeError(f"cannot start engine workers: python executable {python!r} does not exist "
                             "(pass python_executable=)")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["OMP_NUM_THREADS"] = str(threads)
        self._log_dir = tempfile.TemporaryDirectory(prefix="dsbuild-workers-")
        absorb = "bundle" if absorb_mla is None else ("on" if absorb_mla else "off")
        for rank in range(1, self.world):
            log = Path(self._log_dir.name) / f"rank{rank}.log"
            self._logs.append(log)
            cmd = [python, "-m", "builder.engine.worker", "--engine", str(self.bundle.root), "--rank", str(rank),
                   "--world", str(self.world), "--store-host", "127.0.0.1", "--store-port", str(self._store.port),
                   "--device", self.device, "--dtype", dtype_name, "--absorb-mla", absorb]
            with open(log, "wb") as fh:
                self._procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                                    cwd=str(REPO_ROOT)))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(1, self.world))
        while pending:
            for rank in sorted(pending):
                if self._store.check([ready_key(rank)]):
                    status = self._store.get(ready_key(rank)).decode()
                    if status != "ok":
                        raise ServeError(f"engine rank {rank} failed to start: {status.removeprefix('error: ')}")
                    pending.discard(rank)
                elif self._procs[rank - 1].poll() is not None:
                    raise ServeError(f"engine rank {rank} exited with code {self._procs[rank - 1].returncode} "
                                     f"while starting: {self._log_tail(rank)}")
            if pending and time.monotonic() > deadline:
                raise ServeError(f"engine ranks {sorted(pending)} did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def _log_tail(self, rank: int, lines: int = 5) -> str:
        try:
            text = self._logs[rank - 1].read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(no output)"

    # ----- the contract -----
    def generate(self, requests: list[GenerationRequest], *,
                 on_token: Callable[[int, int], None] | None = None,
                 speculative: SpeculativeOptions | None = None, micro_batches: bool = True) -> list[GenerationResult]:
        """``speculative``: None for plain decoding, or how to decode speculatively (MTP or a draft model's
        bundle). ``micro_batches``: with PP, overlap the stages on micro-batches (False: one batch through the
        stages in turn)."""
        if not requests:
            self._check_open()
            return []
        return self._collective(lambda: self._driver.generate(list(requests), on_token=on_token,
                                                              speculative=speculative, micro_batches=micro_batches))

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Float32 logits at every position of each prompt (``[len, vocab]``), for verification."""
        return self._collective(lambda: self._driver.prompt_logits([list(p) for p in prompts]))

    def rank_stats(self) -> list[dict[str, int]]:
        """Per rank: peak/current RSS, loaded weight bytes and rank-file tensor bytes."""
        return self._collective(self._driver.rank_stats)

    def scheduler(self, *, max_batch: int = 16, window_s: float = 0.0,
                  speculative: SpeculativeOptions | None = None) -> "Scheduler":
        """The service's continuous-batching scheduler (made on the first call; later calls return it)."""
        self._check_open()
        if self._scheduler is None:
            self._scheduler = Scheduler(self, max_batch=max_batch, window_s=window_s, speculative=speculative)
        return self._scheduler

    @property
    def broken(self) -> str | None:
        """Why the ranks can no longer work together (the service must be replaced), else None."""
        return self._broken

    def _collective(self, call):
        """Run one command on every rank. A rank that dies mid-command breaks every later collective too, so the
        first failure is turned into one error naming the rank and its last log lines, and every later call gets
        the same error at once instead of a gloo message about a closed socket."""
        self._check_open()
        with self._lock:
            if self._broken:
                raise ServeError(self._broken)
            try:
                return call()
            except RequestError:
                raise  # refused on rank 0 before anything was broadcast
            except Exception as exc:
                if self.world == 1:
                    raise
                self._broken = self._failure(exc)
                raise ServeError(self._broken) from exc

    def _failure(self, exc: Exception) -> str:
        deadline = time.monotonic() + 2.0  # the peer's socket closes a moment before its exit status is visible
        while time.monotonic() < deadline and all(p.poll() is None for p in self._procs):
            time.sleep(0.05)
        dead = [(rank, p.returncode) for rank, p in enumerate(self._procs, start=1) if p.poll() is not None]
        if dead:
            rank, code = dead[0]
            what = f"engine rank {rank} exited with code {code} during a request ({self._log_tail(rank)})"
        else:
            what = f"a collective between the engine's ranks failed ({str(exc).splitlines()[0][:200]})"
        return f"{what}; this service cannot continue: close it and start a new one"

    def tokenizer(self):
        return self.bundle.tokenizer()

    @property
    def engine(self) -> Engine:
        return self._driver.engine

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        if self._scheduler is not None:
            self._scheduler.close(timeout=timeout)
        self._closed = True
        if self.world > 1 and hasattr(self, "_driver"):
            # A request still running in another thread finishes first; a stuck one is cut off by the kill below.
            idle = self._lock.acquire(timeout=timeout)
            try:
                if idle and not self._broken and all(p.poll() is None for p in self._procs):
                    self._driver.stop()
            finally:
                if idle:
                    self._lock.release()
                if dist.is_initialized():
                    dist.destroy_process_group()
                deadline = time.monotonic() + timeout
                for p in self._procs:
                    try:
                        p.wait(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                self._kill_workers()
        if self._log_dir is not None:
            self._log_dir.cleanup()

    def _kill_workers(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if dist.is_initialized() and self._closed is False:
            dist.destroy_process_group()

    def _check_open(self) -> None:
        if self._closed:
            raise ServeError("the engine service is closed")

    def __enter__(self) -> "EngineService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._kill_workers()
        except Exception:
            pass


@dataclass(eq=False)
class Ticket:
    """One submitted request: its callbacks and whether it was cancelled."""

    id: int
    request: GenerationRequest
    on_token: Callable[[int], None] | None
    on_done: Callable[[GenerationResult], None]
    on_start: Callable[[int], None] | None = None
    cancelled: bool = False
    started_ns: int = 0  # when it joined a batch (time.time_ns)


class Scheduler:
    """Continuous batching on rank 0 (TensorRT-LLM's in-flight batching, for the reference engine): requests are
    submitted from any thread; one scheduling thread runs them on every rank as a running batch, where a request
    joins at the next token boundary after it arrives (up to ``max_batch`` rows) and leaves when it finishes or is
    cancelled. ``on_token(token)`` and ``on_done(result)`` run on the scheduling thread, between steps: keep them
    short (hand the work to another thread). ``window_s``: when the batch is empty, how long the first request
    waits for others to share its prefill.

    Speculative decoding and attention-DP layouts run whole batches instead (a batch forms from what is waiting and
    decodes to its end, as before): their per-row state does not follow rows that come and go."""

    def __init__(self, service: EngineService, *, max_batch: int, window_s: float,
                 speculative: SpeculativeOptions | None):
        self.service, self.max_batch, self.window_s = service, max(1, max_batch), max(0.0, window_s)
        self.speculative = speculative
        self.continuous = speculative is None and not service.engine.model.attention_dp
        self._inbox: queue.Queue[Ticket | None] = queue.Queue()
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._in_flight: list[Ticket] = []  # the scheduling thread's running requests (failed together if it must)
        self._thread = threading.Thread(target=self._loop, name="dsbuild-scheduler", daemon=True)
        self._thread.start()

    # ----- any thread -----
    def submit(self, request: GenerationRequest, *, on_done: Callable[[GenerationResult], None],
               on_token: Callable[[int], None] | None = None,
               on_start: Callable[[int], None] | None = None) -> Ticket:
        """Queue ``request``; ``on_done`` gets its result (finish_reason "error" with the reason when it fails),
        ``on_token`` each token as it is chosen, ``on_start`` the size of the batch it joins."""
        ticket = Ticket(next(self._ids), request, on_token, on_done, on_start)
        if self._stopping.is_set() or self.service.broken:
            self._deliver(ticket, self._failed(self.service.broken or "the engine service is closed"))
            return ticket
        self._inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """End the request at the next token boundary (its result: finish_reason "cancelled")."""
        ticket.cancelled = True

    def close(self, timeout: float = 10.0) -> None:
        """Stop: running requests end at the next token boundary (an error saying so; under whole-batch scheduling
        the batch in flight ends first), queued ones are answered as not run."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout=timeout)

    # ----- the scheduling thread -----
    def _loop(self) -> None:
        waiting: list[Ticket] = []  # a runner leaves here what it did not start when the scheduler closes
        while not self._stopping.is_set():
            first = self._inbox.get()
            if first is None:
                break
            waiting = self._gather([first])
            with self.service._lock:
                try:
                    if self.service.broken:
                        raise ServeError(self.service.broken)
                    if self.continuous:
                        self._run_batch(waiting)
                    else:
                        self._run_whole(waiting)
                except Exception as exc:
                    # With several ranks they may now be out of step: the service cannot go on. A world of one
                    # has no peers to lose; its next batch starts afresh.
                    why = self.service.broken or f"the engine failed: {type(exc).__name__}: {exc}"
                    if self.service.world > 1 and not self.service.broken:
                        why = self.service._broken = self.service._failure(exc)
                    for t in self._in_flight + waiting + self._drain():
                        self._deliver(t, self._failed(why))
                    self._in_flight, waiting = [], []
        for t in waiting + self._drain():
            self._deliver(t, self._failed(CLOSED_BEFORE_RUN))

    def _gather(self, waiting: list[Ticket]) -> list[Ticket]:
        """What is queued, after waiting up to ``window_s`` for up to ``max_batch`` requests."""
        deadline = time.monotonic() + self.window_s
        while len(waiting) < self.max_batch:
            try:
                left = deadline - time.monotonic()
                t = self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if t is None:
                self._stopping.set()
                break
            waiting.append(t)
        return waiting

    def _drain(self) -> list[Ticket]:
        out = []
        while True:
            try:
                t = self._inbox.get_nowait()
            except queue.Empty:
                return out
            if t is not None:
                out.append(t)

    def _admit(self, waiting: list[Ticket], room: int) -> list[Ticket]:
        """Up to ``room`` valid, uncancelled requests from the front of ``waiting`` (removed from it); the others
        are answered at once (refused: an error naming the problem; cancelled: empty)."""
        out = []
        while waiting and len(out) < room:
            t = waiting.pop(0)
            if t.cancelled:
                self._deliver(t, GenerationResult(token_ids=[], finish_reason="cancelled"))
                continue
            try:
                validate_request(t.request, self.service.engine.cfg, None)
            except RequestError as exc:
                self._deliver(t, self._failed(str(exc)))
                continue
            out.append(t)
        now = time.time_ns()
        for t in out:
            t.started_ns = now
        return out

    def _run_batch(self, waiting: list[Ticket]) -> None:
        """One running batch, from the first request until nothing runs or waits (when closing: until nothing runs;
        what was not started stays in ``waiting``)."""
        driver = self.service._driver
        running: dict[int, Ticket] = {}

        def token(key: int, tok: int) -> None:
            t = running[key]
            if t.on_token is not None:
                t.on_token(tok)

        batch = driver.open_batch(on_token=token)
        while True:
            # Closing (the server stops): every running request leaves at this token boundary and nothing joins,
            # so a shutdown never waits for generations whose clients may be long gone.
            stopping = self._stopping.is_set()
            if not stopping:
                waiting += self._drain()
            joins = self._admit(waiting, self.max_batch - len(batch.seqs)) \
                if batch.accepts_joins and not stopping else []
            running.update((t.id, t) for t in joins)
            self._started(joins, len(batch.seqs) + len(joins))
            self._in_flight = list(running.values())
            leave = [s.key for s in batch.seqs if stopping or running[s.key].cancelled or s.callback_error is not None]
            if not joins and not batch.seqs:
                break
            for seq in driver.advance(batch, join=[(t.id, t.request) for t in joins], leave=leave):
                ticket, result = running.pop(seq.key), seq.result()
                if stopping and result.finish_reason == "cancelled" and not ticket.cancelled:
                    result = self._failed(SHUTTING_DOWN)
                self._deliver(ticket, result)
        self._in_flight = []
        driver.close_batch()

    def _run_whole(self, waiting: list[Ticket]) -> None:
        """Speculative decoding / attention-DP: batches of what waits, each decoded to its end (when closing, what was
        not started stays in ``waiting``)."""
        while waiting and not self._stopping.is_set():  # a batch in flight runs to its end (no row can leave)
            batch = self._admit(waiting, self.max_batch)
            if not batch:
                continue

            def token(i: int, tok: int) -> None:
                if batch[i].on_token is not None:
                    batch[i].on_token(tok)

            self._in_flight = batch
            self._started(batch, len(batch))
            results = self.service._driver.generate([t.request for t in batch], on_token=token,
                                                    speculative=self.speculative)
            self._in_flight = []
            for t, r in zip(batch, results):
                self._deliver(t, r)
            waiting += self._drain()

    @staticmethod
    def _started(tickets: list[Ticket], size: int) -> None:
        for t in tickets:
            if t.on_start is not None:
                try:
                    t.on_start(size)
                except Exception:  # a caller's logging hook must not stop the batch
                    pass

    @staticmethod
    def _failed(message: str) -> GenerationResult:
        return GenerationResult(token_ids=[], finish_reason="error", error=message)

    @staticmethod
    def _deliver(ticket: Ticket, result: GenerationResult) -> None:
        try:
            ticket.on_done(result)
        except Exception:  # the caller's callback failed; nothing more the scheduler can do for it
            pass
