"""Calls from the front to the backend (``--ingest process``): writing the requests, relaying
the status. Shared by the raw forward (``front.py``) and Train's ingest path (``ingest.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]


async def relay_error(context: Context, error: grpc.aio.AioRpcError) -> None:
    """End the client's call with the backend's status, details and trailing metadata."""
    trailing: Any = error.trailing_metadata()
    await context.abort(error.code(), error.details() or "", tuple(trailing) if trailing else ())


async def pump(requests: AsyncIterator[bytes], call: Any) -> None:
    """Send the client's request messages on to the backend, then half-close.

    Stops quietly once the backend has ended the call: its status is the answer. grpc.aio's
    own writer (a request iterator, or ``call.write``) reports a write that loses the race
    with the backend's status as INTERNAL "Internal error from Core" in place of that status
    (grpc/grpc#36066), so the messages go through the call's core object, which leaves the
    status to the status the backend sent.
    """
    # The public writer where a grpc release lacks the core object: statuses, not traffic,
    # would then suffer (test_front checks them).
    send = getattr(getattr(call, "_cython_call", None), "send_serialized_message", call.write)
    try:
        await call.wait_for_connection()
        async for request in requests:
            if call.done():
                return
            await send(request)
        await call.done_writing()
    except Exception:  # the call has ended: its status says how
        return
