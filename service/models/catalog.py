"""The served models: the repository listing, each version's lifecycle, and loading.

``CachedRepository`` (``model_versions``) is the listing; the catalog owns each
version's state and tells the listing which versions it may hand out.

Lifecycle of a version (``VersionState``; Triton's poll and explicit modes):

- found at start, or by ``sync`` (the watcher, every ``--repository-poll-s``): the newest
  version of a name is LOADING (digests verified, sessions built, one warm-up batch run)
  and only then READY; until it is, ``NAME`` keeps resolving to the version before it.
  Older versions (and every version with ``--preload false``) are AVAILABLE: served,
  loaded on first use.
- a load that fails is FAILED: health NOT_SERVING for ``NAME:VERSION``, an error log line
  naming the file, and ``NAME`` stays on what served it; retried when the version's
  files change (or on ``models load``).
- removed from disk or unloaded: DRAINING for ``drain_s`` (``NAME`` moves at once, the
  exact ``NAME:VERSION`` still resolves so calls in flight finish), then gone or UNLOADED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from latentserve.errors import LatentServeError, ModelIntegrityError, ModelNotFound
from latentserve.service.models.settings import ModelSettings, Stamp, read_settings, settings_stamp
from latentserve.service.models.versions import (
    BY_NAME,
    EXACT,
    CachedRepository,
    VersionState,
    VersionStatus,
    files_stamp,
)
from latentserve.service.server.health import NOT_SERVING, SERVING, HealthServicer
from latentserve.worker.runtime.engine import process_memory
from latentserve.worker.runtime.pipeline import Pipeline
from latentserve.worker.runtime.repository import ModelEntry, parse_ref

log = logging.getLogger(__name__)


class ModelCatalog:
    """Resolves model names, loads and warms up versions, and runs their lifecycle."""

    def __init__(self, pipeline: Pipeline, *,
                 on_loaded: Callable[[ModelEntry, str], None] | None = None,
                 on_failed: Callable[[ModelEntry, LatentServeError], None] | None = None,
                 health: HealthServicer | None = None, eager: bool = True,
                 warmup: bool = True, drain_s: float = 5.0, watch: bool = True) -> None:
        # Before the gRPC server starts its threads: glibc's arena limit binds only
        # arenas created after it is set.
        process_memory()
        self.pipeline = pipeline
        self._on_loaded = on_loaded
        self._on_failed = on_failed
        self._health = health
        self.eager = eager
        self.warmup = warmup
        self.drain_s = drain_s
        self.watch = watch
        # Called with a ref whose batchers must go (drained, or settings changed).
        self.on_retire: Callable[[str], None] | None = None
        self._providers: dict[str, str] = {}  # manifest digest -> execution provider
        self._versions: dict[str, VersionStatus] = {}
        self._settings: dict[str, tuple[Stamp, ModelSettings]] = {}
        self._broken_seen: dict[Path, str] = {}
        self._names_published: set[str] = set()
        self._lock = threading.Lock()
        self._sync_lock = threading.RLock()
        repo = pipeline.repository
        self.repository = repo if isinstance(repo, CachedRepository) else None
        if self.repository is not None:
            self.repository.catalog = self

    # -- lookups (the hot path) -------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        return self.pipeline.models()

    def resolve(self, ref: str) -> ModelEntry:
        """``name[:version]`` -> its entry (newest served version when none is given)."""
        parse_ref(ref)  # InvalidInput for a malformed reference, before any lookup
        return self.pipeline.repository.resolve(ref)

    def newest_refs(self) -> set[str]:
        """The version each name resolves to."""
        newest: dict[str, ModelEntry] = {}
        for e in self.entries():
            if self.state_of(e) in BY_NAME:
                newest[e.manifest.name] = e  # sorted by version: the last one wins
        return {e.manifest.ref for e in newest.values()}

    def provider(self, entry: ModelEntry) -> str | None:
        """The execution provider of a loaded model; None if not loaded yet."""
        return self._providers.get(entry.manifest.digest)

    def state_of(self, entry: ModelEntry) -> VersionState | None:
        """None for a version the catalog has not taken in yet (or another digest's)."""
        v = self._versions.get(entry.manifest.ref)
        if v is None or v.entry.manifest.digest != entry.manifest.digest:
            return None if self.repository is not None else VersionState.AVAILABLE
        return v.state

    def check_exact(self, entry: ModelEntry) -> None:
        """Raise why ``NAME:VERSION`` cannot be served now, if it cannot."""
        state = self.state_of(entry)
        if state is None and self.watch:
            self.sync()  # named before the watcher saw it: take it in now
            state = self.state_of(entry)
        if state in EXACT:
            return
        ref = entry.manifest.ref
        if state is VersionState.FAILED:
            raise ModelIntegrityError(self._versions[ref].message)
        if state is VersionState.UNLOADED:
            raise ModelNotFound(f"{ref} is unloaded; `latentserve models load {ref}` serves "
                                "it again")
        raise ModelNotFound(f"{ref} is new and not loaded yet (the repository is not watched: "
                            f"`latentserve models load {ref}` loads it)")

    def refusal(self, name: str) -> LatentServeError | None:
        """Why ``NAME`` resolves to nothing when it has versions: the newest failure."""
        failed = [v for v in self._versions.values()
                  if v.entry.manifest.name == name and v.state is VersionState.FAILED]
        if not failed:
            return None
        return ModelIntegrityError(max(failed, key=lambda v: v.entry.manifest.version).message)

    def draining(self) -> list[ModelEntry]:
        """Versions removed from disk whose calls in flight may still finish."""
        return [v.entry for v in list(self._versions.values())
                if v.state is VersionState.DRAINING]

    def statuses(self) -> list[VersionStatus]:
        """Every version the catalog knows, sorted by ref."""
        with self._lock:
            return sorted(self._versions.values(),
                          key=lambda v: (v.entry.manifest.name, v.entry.manifest.version))

    def settings(self, ref: str) -> ModelSettings:
        """The serving settings of ``ref``'s name (server defaults when it has none)."""
        name, _ = parse_ref(ref)
        got = self._settings.get(name)
        return got[1] if got else ModelSettings()

    # -- loading ------------------------------------------------------------------------------
    def ensure_loaded(self, entry: ModelEntry) -> str:
        """Load (verify digests, build sessions, warm up) on first use; returns the provider."""
        provider = self._providers.get(entry.manifest.digest)
        if provider is not None:
            return provider
        if self.state_of(entry) is VersionState.FAILED:
            # Refused until its files change (sync) or an operator loads it: a code of
            # it in every Reconstruct must not re-verify the files and log each time.
            raise ModelIntegrityError(self._versions[entry.manifest.ref].message)
        try:
            self._read_settings(entry.manifest.name)
            from latentserve.worker.runtime.model_check import check_at_load

            runtime = self.pipeline.runtime(entry.manifest.ref)
            check_at_load(runtime)  # the graphs still give the values recorded at export
            provider = runtime.provider
            if self.warmup:
                self._warm_up(entry)
        except LatentServeError as exc:
            self._failed(entry, exc)
            raise
        with self._lock:
            first = entry.manifest.digest not in self._providers
            self._providers[entry.manifest.digest] = provider
        if first:
            log.info("loaded %s on %s", entry.manifest.ref, provider)
            self._set_state(entry, VersionState.READY)
            if self._on_loaded:
                self._on_loaded(entry, provider)
        return provider

    def _warm_up(self, entry: ModelEntry) -> None:
        """One image through encode, code, decode and decode's network run, so the first
        request does not pay for onnxruntime's first-run allocations."""
        codec = self.pipeline.codec(entry.manifest.ref)
        m = entry.manifest
        # Any-size models warm up on one stride x stride image (format-2 codes).
        size = (m.stride, m.stride) if m.any_size else None
        images = np.zeros((1, m.channels, *(size or m.image_shape[1:])), np.uint8)
        try:
            symbols = codec.runtime.encode(images)
            codec.runtime.decode(codec.decode(codec.encode(symbols, size=size)), size)
        except LatentServeError:
            raise
        except Exception as exc:
            raise ModelIntegrityError(f"{entry.manifest.ref}: the warm-up batch failed: "
                                      f"{type(exc).__name__}: {exc}") from exc

    def _read_settings(self, name: str) -> ModelSettings:
        folder = self.pipeline.repository.root / name
        stamp = settings_stamp(folder)
        got = self._settings.get(name)
        if got is not None and got[0] == stamp:
            return got[1]
        settings = read_settings(folder)
        self._settings[name] = (stamp, settings)
        return settings

    def _failed(self, entry: ModelEntry, exc: LatentServeError) -> None:
        log.error("cannot load %s: %s", entry.manifest.ref, exc)
        with self._lock:
            v = self._versions.get(entry.manifest.ref)
            serving = v is not None and v.state is VersionState.READY and (
                v.entry.manifest.digest == entry.manifest.digest)
        if serving:
            return  # a reload that failed: the sessions in memory still serve
        self._set_state(entry, VersionState.FAILED, str(exc), files=files_stamp(entry))
        if self._on_failed:
            self._on_failed(entry, exc)

    def _load(self, entry: ModelEntry) -> LatentServeError | None:
        if self.state_of(entry) is not VersionState.READY:
            self._set_state(entry, VersionState.LOADING)
        try:
            self.ensure_loaded(entry)
        except LatentServeError as exc:
            return exc
        self._set_state(entry, VersionState.READY)
        return None

    def preload(self) -> list[tuple[ModelEntry, LatentServeError]]:
        """Take in the repository (the newest version of each name loaded when eager);
        returns the failures (others still load)."""
        return self.sync()

    # -- the lifecycle ------------------------------------------------------------------------
    def sync(self) -> list[tuple[ModelEntry, LatentServeError]]:
        """Bring the versions in line with the repository folder; the watcher's step."""
        repo = self.repository
        failures = []
        with self._sync_lock:
            if repo is not None:
                repo.refresh()
                self._report_broken(repo.broken)
            listing = self._listing()  # a plain ModelRepository: its listing, unwatched
            here = {e.manifest.ref: e for e in listing}
            for ref, v in list(self._versions.items()):
                if ref not in here and v.state is not VersionState.DRAINING:
                    log.info("%s was removed from the repository: draining", ref)
                    self._start_drain(v.entry, then_unloaded=False)
            self._check_settings({e.manifest.name for e in listing})
            newest: dict[str, ModelEntry] = {}
            for e in listing:
                newest[e.manifest.name] = e
            for e in listing:
                known = self._versions.get(e.manifest.ref)
                changed = known is not None and known.entry.manifest.digest != e.manifest.digest
                retry = (known is not None and known.state is VersionState.FAILED
                         and not changed and known.files != files_stamp(e))
                if known is not None and not changed and not retry:
                    continue
                if changed and known is not None:
                    self._forget_runtime(known.entry)
                if self.eager and (newest[e.manifest.name] is e or retry):
                    err = self._load(e)
                    if err is not None:
                        failures.append((e, err))
                else:
                    self._set_state(e, VersionState.AVAILABLE)
            self._finish_drains()
            self._publish_names(listing)
        return failures

    def load(self, ref: str) -> VersionStatus:
        """Load (or load again after unload or failure) ``NAME[:VERSION]``; raises why not."""
        with self._sync_lock:
            entry = self._on_disk(ref)
            if self.state_of(entry) is VersionState.FAILED:
                self._forget_runtime(entry)
            err = self._load(entry)
            self._publish_names(self._listing())
            if err is not None:
                raise err
            return self._versions[entry.manifest.ref]

    def reload(self, ref: str) -> VersionStatus:
        """Verify ``ref``'s files again, re-read its settings and rebuild its batchers.

        Identical files keep their sessions (the digests say the model is the same);
        if the check fails, what is serving keeps serving and the error is raised.
        """
        from latentserve.worker.runtime.repository import verify_files

        with self._sync_lock:
            entry = self._on_disk(ref)
            if self.state_of(entry) is not VersionState.READY:
                return self.load(ref)
            try:
                verify_files(entry)
                self._settings.pop(entry.manifest.name, None)
                self._read_settings(entry.manifest.name)
                if self.warmup:
                    self._warm_up(entry)
            except LatentServeError as exc:
                log.error("reload of %s refused, the loaded version keeps serving: %s",
                          entry.manifest.ref, exc)
                raise
            self._retire(entry.manifest.ref)
            log.info("reloaded %s", entry.manifest.ref)
            return self._versions[entry.manifest.ref]

    def unload(self, ref: str) -> list[VersionStatus]:
        """Stop serving ``NAME:VERSION`` (or every version of ``NAME``) after a drain."""
        name, version = parse_ref(ref)
        with self._sync_lock:
            hit = [v for v in self._versions.values() if v.entry.manifest.name == name
                   and (version is None or v.entry.manifest.version == version)
                   and v.state not in (VersionState.UNLOADED, VersionState.DRAINING)]
            if not hit:
                raise ModelNotFound(f"nothing to unload: {ref!r} names no served version")
            for v in hit:
                log.info("unloading %s", v.ref)
                self._start_drain(v.entry, then_unloaded=True)
            self._publish_names(self._listing())
            return [self._versions[v.ref] for v in hit]

    # -- lifecycle internals ------------------------------------------------------------------
    def _listing(self) -> list[ModelEntry]:
        return self.repository.listing() if self.repository is not None else self.entries()

    def _on_disk(self, ref: str) -> ModelEntry:
        name, version = parse_ref(ref)
        if self.repository is not None:
            self.repository.refresh()
        versions = [e for e in self._listing() if e.manifest.name == name]
        if version is not None:
            versions = [e for e in versions if e.manifest.version == version]
        if not versions:
            raise ModelNotFound(f"no model version {ref!r} in {self.pipeline.repository.root}")
        return versions[-1]

    def _set_state(self, entry: ModelEntry, state: VersionState, message: str = "", *,
                   files: tuple[tuple[int, int], ...] = (), then_unloaded: bool = False) -> None:
        ref = entry.manifest.ref
        with self._lock:
            self._versions[ref] = VersionStatus(entry, state, message, files=files,
                                                then_unloaded=then_unloaded)
        if self._health is not None:
            self._health.set(ref, SERVING if state in BY_NAME else NOT_SERVING)

    def _start_drain(self, entry: ModelEntry, *, then_unloaded: bool) -> None:
        self._set_state(entry, VersionState.DRAINING, then_unloaded=then_unloaded)
        self._retire(entry.manifest.ref)  # queued work finishes; new batchers see the drain

    def _finish_drains(self) -> None:
        now = time.monotonic()
        for v in [v for v in self._versions.values() if v.state is VersionState.DRAINING]:
            if now - v.since < self.drain_s:
                continue
            self._retire(v.ref)  # batchers a straggler started during the drain
            self._forget_runtime(v.entry)
            if v.then_unloaded:
                self._set_state(v.entry, VersionState.UNLOADED)
                log.info("unloaded %s", v.ref)
            else:
                with self._lock:
                    self._versions.pop(v.ref, None)
                if self._health is not None:
                    self._health.clear(v.ref)
                log.info("%s drained and forgotten", v.ref)

    def _forget_runtime(self, entry: ModelEntry) -> None:
        digest = entry.manifest.digest
        with self._lock:
            self._providers.pop(digest, None)
        self.pipeline.evict(digest)

    def _retire(self, ref: str) -> None:
        if self.on_retire is not None:
            self.on_retire(ref)

    def _report_broken(self, broken: dict[Path, str]) -> None:
        for path, why in broken.items():
            if self._broken_seen.get(path) == why:
                continue
            log.error("model version %s refused: %s", path.parent, why)
            if self._health is not None:
                self._health.set(f"{path.parent.parent.name}:{path.parent.name}", NOT_SERVING)
        for path in set(self._broken_seen) - set(broken):
            ref = f"{path.parent.parent.name}:{path.parent.name}"
            if self._health is not None and ref not in self._versions:
                self._health.clear(ref)
        self._broken_seen = dict(broken)

    def _check_settings(self, names: set[str]) -> None:
        for name in names & set(self._settings):
            folder = self.pipeline.repository.root / name
            if settings_stamp(folder) == self._settings[name][0]:
                continue
            try:
                self._settings[name] = (settings_stamp(folder), read_settings(folder))
            except LatentServeError as exc:
                log.error("settings of %s not changed, the previous ones stay: %s", name, exc)
                continue
            log.info("settings of %s changed: %s", name, self._settings[name][1])
            for v in list(self._versions.values()):
                if v.entry.manifest.name == name:
                    self._retire(v.ref)

    def _publish_names(self, listing: list[ModelEntry]) -> None:
        if self._health is None:
            return
        names = {e.manifest.name for e in listing} | {
            v.entry.manifest.name for v in self._versions.values()}
        for name in names:
            served = [v for v in self._versions.values()
                      if v.entry.manifest.name == name and v.state in BY_NAME]
            self._health.set(name, SERVING if served else NOT_SERVING)
        for name in self._names_published - names:
            self._health.clear(name)  # every version of it is gone
        self._names_published = names


class RepositoryWatcher:
    """A thread that runs ``catalog.sync()`` every ``poll_s`` seconds until stopped."""

    def __init__(self, catalog: ModelCatalog, poll_s: float) -> None:
        self.catalog = catalog
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latentserve-repo-watch",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self.catalog.watch:
                    self.catalog.sync()
                else:
                    with self.catalog._sync_lock:
                        self.catalog._finish_drains()
            except Exception:
                log.exception("the repository watcher failed; trying again in %.1f s",
                              self.poll_s)
