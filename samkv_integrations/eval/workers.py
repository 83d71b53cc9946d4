"""Answering eval questions in worker processes that share one device.

Greedy decoding of short answers is launch-bound: one process leaves a GPU mostly idle
while Python queues kernels. :class:`WorkerPool` starts ``N`` processes (``spawn``: CUDA
cannot be forked), each loading the model once, and hands them question indices from one
queue, so a worker that drew short questions simply takes more. Each question is answered
whole by one worker, with every method, as in the in-process path (``eval.answering``);
the rows come back to the parent, which alone writes the run directory. Nothing about a
question's answer depends on which worker gave it, so the metrics do not depend on the
worker count once the parent puts the rows back in question order.

Messages from workers to the parent, on one queue: ``("ready", rank, EngineInfo)`` once
the model is loaded, ``("rows", rank, index, rows)`` per question, ``("log", rank,
record)`` for each log record at or above the parent's level, and ``("error", rank,
type name, message, traceback)`` before a worker exits on an exception. The parent raises
the worker's error as its own (a user error keeps its type; its traceback is attached as
the cause, as ``concurrent.futures`` does), stops the other workers, and raises as well when a worker
dies without a word (killed, out of memory), so a failure never leaves a hung pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import traceback
from collections.abc import Iterator, Sequence
from logging.handlers import QueueHandler
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from types import FrameType, TracebackType
from typing import Any

from samkv_integrations.errors import CacheCorruptedError, CacheError, CacheMismatchError
from samkv_integrations.eval.answering import AnswerJob, EngineInfo, Rows, answer_question

__all__ = ["WorkerPool"]

logger = logging.getLogger(__name__)

#: Seconds the parent waits for a message before it checks that the workers are alive.
POLL_S = 1.0
#: Seconds a finished worker gets to exit (CUDA teardown) before it is terminated.
EXIT_S = 30.0
#: Seconds a terminated worker gets to unwind (``_unwind``) before it is killed.
TERMINATE_S = 5.0


class _RemoteTracebackError(Exception):
    """A worker's formatted traceback, attached as the cause of the re-raised exception."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Forward(QueueHandler):
    """Send a worker's log records to the parent, which hands them to its own loggers."""

    def __init__(self, results: Queue[Any], rank: int) -> None:
        super().__init__(results)
        self.rank = rank

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put_nowait(("log", self.rank, record))


def _work(
    rank: int, job: AnswerJob, workers: int, level: int, tasks: Queue[Any], results: Queue[Any]
) -> None:
    """A worker process: load the model, then answer question indices until ``None``."""
    import torch

    root = logging.getLogger()
    root.handlers[:] = [_Forward(results, rank)]
    root.setLevel(level)
    signal.signal(signal.SIGTERM, _unwind)
    try:
        # The workers share the machine's cores: without this each would start one
        # intra-op thread per core and they would spin against each other.
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
        engine = job.engine()
        results.put(("ready", rank, EngineInfo.of(engine)))
        parent = multiprocessing.parent_process()
        while (index := tasks.get()) is not None:
            if parent is not None and not parent.is_alive():
                return  # the parent was killed: nobody would read the answers
            results.put(("rows", rank, index, answer_question(engine, job.questions[index], job)))
    except SystemExit:
        # Stopped by the parent (_unwind): nobody reads the queue any more.
        results.cancel_join_thread()
        raise
    except BaseException as e:  # every failure must reach the parent
        results.put(("error", rank, type(e).__name__, str(e), traceback.format_exc()))
        raise SystemExit(1) from None


def _unwind(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (``terminate`` by the parent) unwinds the worker instead of ending it at once.

    Exiting normally runs the process's finalizers, which release the semaphores it
    created (tqdm's lock); a worker killed outright leaks them and the resource tracker
    warns at shutdown.
    """
    raise SystemExit(128 + signum)


#: Error types a worker's failure is raised as in the parent, by name; any other becomes a
#: RuntimeError naming it. Errors travel as text: the parent never unpickles an exception.
_USER_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        ValueError,
        TypeError,
        FileNotFoundError,
        PermissionError,
        OSError,
        CacheError,
        CacheMismatchError,
        CacheCorruptedError,
    )
}


def _rebuild(type_name: str, message: str) -> Exception:
    """The parent's copy of a worker's error: the same type for user errors."""
    cls = _USER_ERRORS.get(type_name)
    return cls(message) if cls is not None else RuntimeError(f"{type_name}: {message}")


def _death(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class WorkerPool:
    """``workers`` processes answering one job's questions, as a context manager.

    ``ready`` waits until the first worker has loaded the model (the others keep loading
    and are checked as they report); ``answer`` yields ``(index, rows)`` as questions
    complete, in no particular order. Leaving the ``with`` block stops every worker.

    Args:
        job: What to answer with; pickled to each worker.
        workers: Processes to start (>= 1).
    """

    def __init__(self, job: AnswerJob, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        context = multiprocessing.get_context("spawn")
        self._tasks: Queue[Any] = context.Queue()
        self._results: Queue[Any] = context.Queue()
        level = logging.getLogger().getEffectiveLevel()
        self._processes = [
            context.Process(
                target=_work,
                args=(rank, job, workers, level, self._tasks, self._results),
                # Not daemonic: a daemonic process may not start processes of its own
                # (compile workers); close() stops the workers on every way out.
                name=f"samkv-eval-{rank}",
            )
            for rank in range(workers)
        ]
        self._info: EngineInfo | None = None
        self._finished = False

    def __enter__(self) -> WorkerPool:
        for process in self._processes:
            process.start()
        logger.info("started %d eval workers", len(self._processes))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def ready(self) -> EngineInfo:
        """Wait for the first worker to load the model; what it loaded."""
        while self._info is None:
            self._handle(self._next())
        return self._info

    def answer(self, indices: Sequence[int]) -> Iterator[tuple[int, Rows]]:
        """Hand out ``indices``; yield ``(index, rows)`` for each as it completes."""
        for index in indices:
            self._tasks.put(index)
        for _ in self._processes:
            self._tasks.put(None)
        pending = set(indices)
        while pending:
            message = self._next()
            if message[0] == "rows":
                _, _, index, rows = message
                pending.discard(index)
                yield index, rows
            else:
                self._handle(message)
        self._finished = True

    def close(self) -> None:
        """Stop the workers: let finished ones exit, terminate the rest."""
        # The parent must not wait at exit to flush tasks that no worker will read.
        self._tasks.cancel_join_thread()
        for process in self._processes:
            if process.pid is not None:
                process.join(EXIT_S if self._finished else 0)
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(TERMINATE_S)
            if process.is_alive():
                process.kill()
                process.join()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, rank = message[0], message[1]
        if kind != "ready":
            raise RuntimeError(f"eval worker {rank} sent an unexpected {kind!r} message")
        info: EngineInfo = message[2]
        if self._info is None:
            self._info = info
        elif info != self._info:
            # Every worker must answer with the same model, or the rows would mix models.
            raise ValueError(
                f"model: eval worker {rank} loaded fingerprint {info.fingerprint[:12]}, "
                f"the first worker {self._info.fingerprint[:12]}"
            )

    def _next(self) -> tuple[Any, ...]:
        """The next ``ready`` or ``rows`` message; re-raise a worker's error or death."""
        while True:
            try:
                message: tuple[Any, ...] = self._results.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                continue
            if message[0] == "log":
                record: logging.LogRecord = message[2]
                logging.getLogger(record.name).handle(record)
            elif message[0] == "error":
                _, rank, type_name, text_of_error, text = message
                logger.info("eval worker %d failed", rank)
                raise _rebuild(type_name, text_of_error) from _RemoteTracebackError(
                    f"in eval worker {rank}:\n{text}"
                )
            else:
                return message

    def _check_alive(self) -> None:
        # A worker that failed put its error on the queue before exiting; only when the
        # queue is empty did it die without a word.
        if not self._results.empty():
            return
        for rank, process in enumerate(self._processes):
            if process.exitcode not in (None, 0):
                raise RuntimeError(
                    f"eval worker {rank} {_death(process)} without reporting an error "
                    "(out of memory?); run the same command again to resume"
                )
        if all(process.exitcode is not None for process in self._processes):
            raise RuntimeError("every eval worker exited before all questions were answered")
