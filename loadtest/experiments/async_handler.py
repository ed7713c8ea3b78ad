"""Experiment: the shipped handler behind TorchServe's ``asyncCommunication`` worker (ts/async_service.py).

With ``asyncCommunication: true`` in model-config.yaml the frontend keeps sending batches without
waiting for answers and the worker awaits an async entry point per batch; this one runs the shipped
handler's ``handle`` in a thread pool, so several batches are in flight in one worker.
"""
import asyncio
from typing import Any

from cifar10_handler import Cifar10Handler

_service = Cifar10Handler()


async def handle(data: list[dict] | None, context: Any) -> list[Any] | None:
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return await asyncio.get_running_loop().run_in_executor(None, _service.handle, data, context)
