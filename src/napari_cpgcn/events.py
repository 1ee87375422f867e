"""Typed progress events shared by every long job (trainers, pipeline, batch prediction).

Long work is a generator of :class:`Event`; the CLI drains it into progress bars, the GUI
wraps it in a napari ``thread_worker`` and updates widgets per event. Stopping is cooperative:
the generator checks a ``should_stop`` callable between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["EventKind", "Event", "ShouldStop", "relay"]


class EventKind(str, Enum):
    """What an event reports."""

    STAGE_START = "stage_start"   # a pipeline stage begins (stage, message)
    STAGE_END = "stage_end"       # a stage finished (or was skipped: message says so)
    EPOCH_START = "epoch_start"
    BATCH = "batch"               # one optimisation / inference batch (loss, batch, n_batches)
    EPOCH_END = "epoch_end"       # metrics hold the epoch's train loss and validation metrics
    CHECKPOINT = "checkpoint"     # path of a checkpoint just written
    ITEM = "item"                 # one item done (an image in segmentation/prediction)
    LOG = "log"                   # a free-text message
    STOPPED = "stopped"           # stop request honoured; the latest checkpoint is kept
    DONE = "done"                 # the whole job finished; ``result`` may hold its output


@dataclass
class Event:
    """One progress report.

    Only the fields that make sense for ``kind`` are set; the rest keep their defaults.
    """

    kind: EventKind
    stage: str = ""
    epoch: int = 0
    n_epochs: int = 0
    batch: int = 0
    n_batches: int = 0
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    path: str = ""
    result: object = None


#: Polled between batches / images; e.g. ``threading.Event().is_set`` set from the GUI thread.
ShouldStop = Callable[[], bool]



def relay(events: Iterable[Event], stage: str | None = None) -> Generator[Event, None, tuple[bool, object]]:
    """Pass a sub-step's events on (``yield from``) and return ``(stopped, result)``.

    The sub-step's ``DONE`` is not passed on: its ``result`` is returned. A ``STOPPED`` event is
    passed on and ends the relay with ``stopped=True`` (the caller then returns too). ``stage``,
    when given, is written into every relayed event::

        stopped, cache = yield from relay(build_crop_cache(...))
        if stopped:
            return
    """
    for ev in events:
        if stage is not None:
            ev.stage = stage
        if ev.kind == EventKind.DONE:
            return False, ev.result
        yield ev
        if ev.kind == EventKind.STOPPED:
            return True, None
    return False, None
