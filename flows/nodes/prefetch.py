"""Prefetch: read batches ahead of the consumer in a background thread (and pin them).

It replaces torchdata's ``Prefetcher`` and ``PinMemory`` for three reasons: an error reaches the
consumer as the very exception the flow raised (a ``StageError`` keeps its one-line message,
``stage`` and ``sample``); stopping waits for the thread to finish the item it is working on, so
no thread is left running torch code when the process exits (which aborts it: "terminate called
without an active exception"); and the state after an epoch's end includes everything the flow
counted while finding that end (samples skipped after the last batch).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from typing import Any

import torch
from torch.utils.data._utils.pin_memory import pin_memory
from torchdata.nodes import BaseNode

from flows.nodes.graph import close_graph

_POLL = 0.1  # seconds between looks at the stop flag while waiting
_END = object()  # queued after the last item, with the state after the source's end
_running: weakref.WeakSet[Prefetch] = weakref.WeakSet()


class Prefetch(BaseNode):
    """Keeps up to ``depth`` items of ``source`` ready, read by one background thread; ``pin``
    pins them in page-locked memory there (when CUDA is available). The state is the source's
    state after the last item delivered: ``{"source": ...}``."""

    def __init__(self, source: BaseNode, depth: int = 2, pin: bool = False):
        super().__init__()
        self.source, self.depth = source, max(1, depth)
        # the CUDA device to pin for, None when not pinning (or no CUDA)
        self._pin = torch.cuda.current_device() if pin and torch.cuda.is_available() else None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # set, and the thread stops after its current item
        weakref.finalize(self, self._stop.set)  # dropped without close(): the thread ends too
        self._queue: queue.Queue[tuple[Any, Any, Any]] = queue.Queue()
        self._slots = threading.Semaphore(self.depth)
        self._state: dict = {}
        self._ended = False

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._shutdown()
        self.source.reset(initial_state["source"] if initial_state else None)
        self._state, self._ended = self.source.state_dict(), False
        self._stop.clear()
        self._queue, self._slots = queue.Queue(), threading.Semaphore(self.depth)
        self._thread = threading.Thread(target=_fill, name="flows-prefetch", daemon=True,
                                        args=(self.source, self._pin,
                                              self._stop, self._queue, self._slots))
        _running.add(self)
        self._thread.start()

    def next(self) -> Any:
        if self._ended:  # StopIteration every time after the end, or after an error
            raise StopIteration
        kind, value, state = self._queue.get()
        self._slots.release()
        self._ended = kind is not None
        if isinstance(kind, BaseException):
            raise kind  # the flow's own exception, as prefetch=0 would raise it
        self._state = state
        if kind is _END:
            raise StopIteration
        return value

    def get_state(self) -> dict:
        return {"source": self._state}

    def queues(self) -> tuple[int, int]:
        """(ready, capacity) of the items read ahead."""
        return self._queue.qsize(), self.depth

    def _shutdown(self) -> None:
        """Stop the thread, waiting for the item it is working on (``Loader.close()`` calls this)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        _running.discard(self)


def _fill(source: BaseNode, pin: int | None, stop: threading.Event, out: queue.Queue,
          slots: threading.Semaphore) -> None:
    """The thread: next() on the source while a slot is free, until the end, an error or stop.
    ``pin`` is the CUDA device to pin for, or None."""
    if pin is not None:
        torch.cuda.set_device(pin)
    while not stop.is_set():
        if not slots.acquire(timeout=_POLL) or stop.is_set():
            continue
        try:
            item = next(source)
            out.put((None, pin_memory(item) if pin is not None else item, source.state_dict()))
        except StopIteration:
            out.put((_END, None, source.state_dict()))
            return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer as it is
            out.put((error, None, None))
            return


def _stop_all() -> None:
    """At exit, for loaders nobody closed: stop their threads and worker pools before the
    interpreter waits for worker threads and tears torch down."""
    for prefetch in list(_running):
        close_graph(prefetch)  # its thread first, then the workers below


# like concurrent.futures: before the interpreter joins its threads (atexit would come after)
getattr(threading, "_register_atexit", atexit.register)(_stop_all)
# a forked worker process has no prefetch thread, and the locks it copied may be held
os.register_at_fork(after_in_child=_running.clear)
