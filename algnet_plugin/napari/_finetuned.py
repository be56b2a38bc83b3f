"""The models fine-tuned in this napari session: the Fine-tune widget adds each new folder, the model lists of
both widgets offer them. Light on purpose (no training engine), so the Deblur widget can import it."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

from psygnal.containers import EventedList
from qtpy.QtCore import QObject

FINETUNED: EventedList[Path] = EventedList()
"""``save_pretrained`` folders written by the Fine-tune widget in this session, oldest first."""


def on_finetuned(native: QObject, method: Callable[[], object]) -> None:
    """Call the bound ``method`` after every folder added to :data:`FINETUNED`, for as long as its object lives
    and its Qt widget ``native`` is not deleted (a closed dock). Neither is kept alive by this connection."""
    signal = FINETUNED.events.inserted
    signal.connect(method)  # psygnal holds a bound method by a weak reference
    ref = weakref.WeakMethod(method)

    def disconnect(*_: object) -> None:
        if (live := ref()) is not None:
            signal.disconnect(live)

    native.destroyed.connect(disconnect)
