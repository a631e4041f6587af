"""Keep Python's cyclic garbage collector off what a server loads once.

A full collection walks every container object the process holds, with the GIL held. In
a server with a 1M-item pair loaded it took 13 ms alone and 19-51 ms under load (measured
with ``gc.callbacks`` at 500 calls/s: one every 15 s or so), and every call in flight
waits it out: a pause of that length every few thousand calls is the p99.

``enable()`` (``serve`` calls it once the first pair is loaded, before SERVING) moves
everything alive then (imports, the pair, the server's objects) into the permanent
generation (``gc.freeze``): later collections walk only what was made since. Reference
counting still frees frozen objects; only cycles among them wait. So a swap
(``pair_changed``) unfreezes them, the old pair's cycles are collected by the next full
collection that runs at least ``settle_s`` after the swap (when calls still on the old
pair are long done), and what is alive after it is frozen again. Outside a server
(``enable`` never called) nothing here does anything: tests and tools keep the collector
as Python sets it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

SETTLE_S = 10.0  # after a swap: calls on the old pair are done (deadlines are shorter)

_lock = threading.Lock()
_enabled = False
_refreeze_after: float | None = None  # time.monotonic(); None: nothing to refreeze


def enable() -> None:
    """Freeze what is alive now, and refreeze after each swap (see the module docstring)."""
    global _enabled
    with _lock:
        if not _enabled:
            gc.callbacks.append(_after_collection)
            _enabled = True
    gc.collect()  # the loading's own garbage is freed, not frozen
    gc.freeze()
    log.info("%d long-lived objects kept out of the cyclic garbage collector",
             gc.get_freeze_count())


def pair_changed(settle_s: float = SETTLE_S) -> None:
    """A new pair serves: what was frozen with the old one may be collected again, and is
    frozen again after the first full collection ``settle_s`` from now."""
    global _refreeze_after
    if not _enabled:
        return
    with _lock:
        gc.unfreeze()
        _refreeze_after = time.monotonic() + settle_s


def _after_collection(phase: str, info: dict) -> None:
    """gc callback: after a full collection past the settling time, freeze the survivors."""
    global _refreeze_after
    if phase != "stop" or info.get("generation") != 2 or _refreeze_after is None:
        return
    if time.monotonic() < _refreeze_after:
        return
    _refreeze_after = None
    gc.freeze()
