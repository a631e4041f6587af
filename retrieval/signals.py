"""The wait every gRPC server of ours stops on: the service, and the load test's echo and
naive servers."""

from __future__ import annotations

import asyncio
import signal


async def stop_signalled() -> None:
    """Return on the first SIGTERM or SIGINT (the handlers are removed again)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
