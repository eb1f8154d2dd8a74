"""A small thread-safe LRU map, for per-process caches of derived data (flattened text,
BM25 tokens). Entries hold patient data: they live in process memory only, bounded in count."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

from adapter.metrics import cache_lookup

V = TypeVar("V")


class LRU(Generic[V]):
    def __init__(self, maxsize: int, name: str | None = None) -> None:
        self.maxsize = maxsize
        self.name = name  # the `cache` label of fhir_rerank_cache_lookups_total
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
        if self.maxsize > 0:
            cache_lookup(self.name, value is not None)
        return value

    def put(self, key: Hashable, value: V) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def resize(self, maxsize: int) -> None:
        with self._lock:
            self.maxsize = maxsize
            while len(self._data) > max(maxsize, 0):
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
