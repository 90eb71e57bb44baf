"""Model versions' states, and the repository listing the catalog serves from.

``ModelRepository.entries()`` globs and stats every manifest (re-parsing only changed
ones), and the pipeline resolves a name on every call. ``CachedRepository`` looks at
the files at most every ``check_s`` seconds, skips a manifest that does not parse
(``broken``), and asks its ``ModelCatalog`` (``service/models/catalog.py``, which owns each
version's ``VersionState``) which versions it may hand out: by name, only AVAILABLE or
READY ones; by exact ``NAME:VERSION``, LOADING and DRAINING ones too.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from latentserve.errors import LatentServeError, ModelIntegrityError, ModelNotFound
from latentserve.service.models.settings import settings_path
from latentserve.worker.runtime.repository import ModelEntry, ModelRepository, parse_ref

if TYPE_CHECKING:
    from latentserve.service.models.catalog import ModelCatalog


class VersionState(str, enum.Enum):
    LOADING = "loading"
    AVAILABLE = "available"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    UNLOADED = "unloaded"


# Which versions the pieces of a lookup may see.
LISTED = {VersionState.AVAILABLE, VersionState.READY, VersionState.FAILED,
           VersionState.DRAINING}
BY_NAME = {VersionState.AVAILABLE, VersionState.READY}
EXACT = {VersionState.AVAILABLE, VersionState.READY, VersionState.LOADING,
          VersionState.DRAINING}


@dataclass
class VersionStatus:
    """Where one model version stands (``ModelControl.List`` shows these)."""

    entry: ModelEntry
    state: VersionState
    message: str = ""
    since: float = field(default_factory=time.monotonic)
    files: tuple[tuple[int, int], ...] = ()  # stat of its files when it failed
    then_unloaded: bool = False  # DRAINING ends in UNLOADED (kept) rather than gone

    @property
    def ref(self) -> str:
        return self.entry.manifest.ref


def files_stamp(entry: ModelEntry) -> tuple[tuple[int, int], ...]:
    """(mtime, size) of a version's files and its name's settings: what a retry waits on."""
    out = []
    # The name's settings file too: a load its bad settings refused is retried once fixed.
    for path in [entry.path / "manifest.json", settings_path(entry.path.parent),
                 *(entry.path / f.path for f in entry.manifest.files.values())]:
        try:
            st = path.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, -1))
    return tuple(out)


class CachedRepository(ModelRepository):
    """A ModelRepository whose listing is looked at again at most every ``check_s``."""

    def __init__(self, root: str | Path, *, check_s: float = 1.0) -> None:
        super().__init__(root)
        self.check_s = check_s
        self.catalog: ModelCatalog | None = None  # set by the catalog that serves it
        self.broken: dict[Path, str] = {}  # manifest path -> why it does not parse
        self._lock = threading.Lock()
        self._listing: list[ModelEntry] | None = None
        self._checked = 0.0

    def listing(self) -> list[ModelEntry]:
        """Every version with a readable manifest, whatever its state."""
        now = time.monotonic()
        with self._lock:
            if self._listing is None or now - self._checked >= self.check_s:
                self._listing = self._scan()
                self._checked = now
            return list(self._listing)

    def _scan(self) -> list[ModelEntry]:
        found, broken = [], {}
        for mpath in self.manifest_paths():
            try:
                found.append(self.read_entry(mpath))
            except (ModelIntegrityError, OSError) as exc:
                # One bad manifest must not hide the good ones (a version being copied in).
                broken[mpath] = str(exc)
        self.broken = broken
        return sorted(found, key=lambda e: (e.manifest.name, e.manifest.version))

    def entries(self) -> list[ModelEntry]:
        listing = self.listing()
        if self.catalog is None:
            return listing
        shown = [e for e in listing if self.catalog.state_of(e) in LISTED]
        refs = {e.manifest.ref for e in shown}
        shown += [e for e in self.catalog.draining() if e.manifest.ref not in refs]
        return sorted(shown, key=lambda e: (e.manifest.name, e.manifest.version))

    def refresh(self) -> None:
        """Look at the files again on the next ``entries()``."""
        with self._lock:
            self._checked = -self.check_s - 1.0

    def resolve(self, ref: str) -> ModelEntry:
        name, version = parse_ref(ref)
        found = self._find(name, version)
        if found is None:
            self.refresh()  # a version exported since the last look
            found = self._find(name, version)
        if found is None:
            raise self._missing(name, version)
        return found

    def _find(self, name: str, version: int | None) -> ModelEntry | None:
        cands = [e for e in self.listing() if e.manifest.name == name]
        catalog = self.catalog
        if catalog is not None:
            refs = {e.manifest.ref for e in cands}
            cands += [e for e in catalog.draining()
                      if e.manifest.name == name and e.manifest.ref not in refs]
        if version is None:
            ok = [e for e in cands if catalog is None or catalog.state_of(e) in BY_NAME]
            return max(ok, key=lambda e: e.manifest.version) if ok else None
        for e in cands:
            if e.manifest.version == version:
                if catalog is not None:
                    catalog.check_exact(e)
                return e
        return None

    def _missing(self, name: str, version: int | None) -> LatentServeError:
        versions = [e for e in self.entries() if e.manifest.name == name]
        if version is None and self.catalog is not None:
            refused = self.catalog.refusal(name)
            if refused is not None:
                return refused
        if not versions:
            known = ", ".join(self.names()) or "none"
            return ModelNotFound(f"no model named {name!r} in {self.root}; available: {known}",
                                 model=name if version is None else f"{name}:{version}")
        have = ", ".join(str(e.manifest.version) for e in versions)
        return ModelNotFound(f"model {name!r} has no version {version}; versions: {have}",
                             model=f"{name}:{version}")
