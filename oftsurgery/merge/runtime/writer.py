"""Packing and writing a decoder layer on one background thread while the next layer is solved.

`BackgroundWriter` runs the jobs the merge submits (pack, re-check, copy to the host, write) on one
worker thread, in submission order, with a bounded queue, so the output is byte for byte that of a
sequential run (`InlineWriter`) and memory stays bounded. A failed job is raised in the main thread
at its next `submit` or at `close`, naming the layer; `abort` stops the worker and waits for it.
Memory and overlap: docs/performance.md ("The data-free merge").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oftsurgery.io import CheckpointWriter

# A job yields what to write: (name, tensor) pairs, or (name, ("file", dtype, shape, path, offset, nbytes))
# for a tensor copied unchanged from its source file.
Job = Callable[[], Iterable[tuple[str, Any]]]


class WorkerFailed(Exception):
    """Raised in the main thread when a job failed in the worker; `label` names what it was writing."""

    def __init__(self, label: str, error: BaseException):
        super().__init__(label)
        self.label = label
        self.error = error


def write_items(writer: "CheckpointWriter", items: Iterable[tuple[str, Any]]) -> None:
    for name, item in items:
        if isinstance(item, tuple) and item and item[0] == "file":
            _, dtype, shape, path, offset, nbytes = item
            writer.add_file_range(name, dtype, shape, path, offset, nbytes)
        else:
            writer.add(name, item)  # a host tensor: jobs copy GPU results to the host themselves


class BackgroundWriter:
    """Runs write jobs on one worker thread, in order, at most `depth` jobs queued."""

    def __init__(self, writer: "CheckpointWriter", depth: int = 1):
        self.writer = writer
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._failure: WorkerFailed | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oftsurgery-pack-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            entry = self._jobs.get()
            if entry is None:
                return
            label, job = entry
            if self._failure is not None or self._stop.is_set():
                continue  # drain without working, so a blocked submit wakes up
            try:
                write_items(self.writer, job())
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._failure = exc if isinstance(exc, WorkerFailed) else WorkerFailed(label, exc)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def submit(self, label: str, job: Job) -> None:
        """Queue a job (blocks while the queue is full); raises a failure of an earlier job."""
        self._raise_failure()
        while True:
            try:
                self._jobs.put((label, job), timeout=0.5)
                break
            except queue.Full:
                if not self._thread.is_alive():  # pragma: no cover - the worker never dies without a failure
                    break
                self._raise_failure()
        self._raise_failure()

    def close(self) -> None:
        """Wait for every job; raise the first failure."""
        while self._thread.is_alive():  # (a dead worker would never make room in a full queue)
            try:
                self._jobs.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise_failure()

    def abort(self) -> None:
        """Stop after the running job (the queued ones are dropped) and wait for the worker."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._jobs.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()


class InlineWriter:
    """The same interface, running each job at once in the calling thread (no overlap)."""

    def __init__(self, writer: "CheckpointWriter"):
        self.writer = writer

    def submit(self, label: str, job: Job) -> None:
        try:
            write_items(self.writer, job())
        except WorkerFailed:
            raise
        except Exception as exc:
            raise WorkerFailed(label, exc) from exc

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
