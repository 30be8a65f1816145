"""Pausing the garbage collector while regdsl builds many objects at once.

Parsing a large rule file, or resolving rules against a model of tens of
thousands of tensors, allocates objects that all stay alive. Each allocation
burst makes CPython's cyclic collector walk every live object, the model's
modules included, several times over: on a 20,000-tensor model that cost more
than the work itself, and on a 50,000-line file, half of the parse. Nothing
built here forms reference cycles the collector would need to free, so it
waits until the work is done.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside the block; nested and already-disabled uses leave it as they found it.

    On the way out the young generation is collected once, here: the objects made inside are
    looked at one time, and by the call that made them, not by whatever code allocates next.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)
