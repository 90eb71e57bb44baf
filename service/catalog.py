"""The served models: a repository listing cached for the hot path, and which are loaded.

``ModelRepository.entries()`` globs and stats every manifest (re-parsing only changed
ones), and the pipeline resolves a name on every call. ``CachedRepository`` looks at
the files at most every ``check_s`` seconds (and at once when a name is not found), so
a new model version is picked up without a restart and the hot path touches no disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from latentserve.worker.engine import process_memory
from latentserve.worker.errors import LatentServeError, ModelNotFound
from latentserve.worker.pipeline import Pipeline
from latentserve.worker.repository import ModelEntry, ModelRepository, parse_ref

log = logging.getLogger(__name__)


class CachedRepository(ModelRepository):
    """A ModelRepository whose listing is looked at again at most every ``check_s``."""

    def __init__(self, root: str | Path, *, check_s: float = 1.0) -> None:
        super().__init__(root)
        self.check_s = check_s
        self._lock = threading.Lock()
        self._entries: list[ModelEntry] | None = None
        self._checked = 0.0

    def entries(self) -> list[ModelEntry]:
        now = time.monotonic()
        with self._lock:
            if self._entries is None or now - self._checked >= self.check_s:
                # The base class re-parses only manifests whose stat changed.
                self._entries = super().entries()
                self._checked = now
            return list(self._entries)

    def refresh(self) -> None:
        """Look at the files again on the next ``entries()``."""
        with self._lock:
            self._checked = -self.check_s - 1.0

    def resolve(self, ref: str) -> ModelEntry:
        try:
            return super().resolve(ref)
        except ModelNotFound:
            self.refresh()  # a version exported since the last look
            return super().resolve(ref)


class ModelCatalog:
    """Resolves model names and loads models once, reporting each load to ``on_loaded``."""

    def __init__(self, pipeline: Pipeline, *,
                 on_loaded: Callable[[ModelEntry, str], None] | None = None,
                 on_failed: Callable[[ModelEntry, LatentServeError], None] | None = None) -> None:
        # Before the gRPC server starts its threads: glibc's arena limit binds only
        # arenas created after it is set.
        process_memory()
        self.pipeline = pipeline
        self._on_loaded = on_loaded
        self._on_failed = on_failed
        self._providers: dict[str, str] = {}  # manifest digest -> execution provider
        self._lock = threading.Lock()

    def entries(self) -> list[ModelEntry]:
        return self.pipeline.models()

    def resolve(self, ref: str) -> ModelEntry:
        """``name[:version]`` -> its entry (newest version when none is given)."""
        parse_ref(ref)  # InvalidInput for a malformed reference, before any lookup
        return self.pipeline.repository.resolve(ref)

    def newest_refs(self) -> set[str]:
        newest: dict[str, ModelEntry] = {}
        for e in self.entries():
            newest[e.manifest.name] = e  # sorted by version: the last one wins
        return {e.manifest.ref for e in newest.values()}

    def provider(self, entry: ModelEntry) -> str | None:
        """The execution provider of a loaded model; None if not loaded yet."""
        return self._providers.get(entry.manifest.digest)

    def ensure_loaded(self, entry: ModelEntry) -> str:
        """Load (verify digests, build sessions) on first use; returns the provider."""
        provider = self._providers.get(entry.manifest.digest)
        if provider is not None:
            return provider
        try:
            provider = self.pipeline.runtime(entry.manifest.ref).provider
        except LatentServeError as exc:
            if self._on_failed:
                self._on_failed(entry, exc)
            raise
        with self._lock:
            first = entry.manifest.digest not in self._providers
            self._providers[entry.manifest.digest] = provider
        if first:
            log.info("loaded %s on %s", entry.manifest.ref, provider)
            if self._on_loaded:
                self._on_loaded(entry, provider)
        return provider

    def preload(self) -> list[tuple[ModelEntry, LatentServeError]]:
        """Load the newest version of every model; returns the failures (others still load)."""
        failures = []
        newest = self.newest_refs()
        for e in self.entries():
            if e.manifest.ref in newest:
                try:
                    self.ensure_loaded(e)
                except LatentServeError as exc:
                    log.error("cannot load %s: %s", e.manifest.ref, exc)
                    failures.append((e, exc))
        return failures
