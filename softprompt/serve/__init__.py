"""Serving: the engine (many tasks on one frozen model, mixed batches) apart from any HTTP layer."""

from .engine import Engine
from .handle import Completion, Event, Handle, Request
from .tasks import PrefixCache, QueueFull, RequestError, TaskRefused, TaskRegistry, UnknownTask

__all__ = ["Engine", "Request", "Completion", "Event", "Handle", "TaskRegistry", "PrefixCache", "QueueFull",
           "RequestError", "UnknownTask", "TaskRefused"]
