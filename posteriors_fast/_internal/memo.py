"""A per-tensor memo that does not keep tensors alive.

``weakref.WeakKeyDictionary`` compares keys with ``==``, which for tensors is
elementwise; this memo keys on object identity and drops an entry when its
tensor is garbage-collected. Each entry stores a fingerprint (storage pointer,
version counter, ...) so in-place changes to the tensor invalidate it.
"""

import weakref
from typing import Any, Dict, Hashable, Tuple

import torch


def fingerprint(t: torch.Tensor) -> Tuple:
    """Identifies the current contents of ``t``: a rebound ``.data`` or an
    in-place write changes it."""
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


class TensorMemo:
    """``memo.get(t, tag)`` / ``memo.put(t, tag, value)`` keyed on ``t``'s identity."""

    def __init__(self) -> None:
        self._entries: Dict[int, Tuple[weakref.ref, Hashable, Any]] = {}

    def get(self, t: torch.Tensor, tag: Hashable = None) -> Any:
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != (fingerprint(t), tag):
            return None
        return entry[2]

    def put(self, t: torch.Tensor, value: Any, tag: Hashable = None) -> None:
        key = id(t)
        entries = self._entries
        ref = weakref.ref(t, lambda _r, key=key: entries.pop(key, None))
        entries[key] = (ref, (fingerprint(t), tag), value)
