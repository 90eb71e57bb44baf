"""Read a model repository: ``<root>/<name>/<version>/manifest.json`` plus ONNX files.

Listing reads manifests only; ``load`` also verifies the sha256 of every file and
refuses a model whose digests do not match, naming the file.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from latentserve.errors import InvalidInput, ModelIntegrityError, ModelNotFound
from latentserve.worker.runtime.manifest import Manifest, parse_manifest, sha256_file


@dataclass(frozen=True)
class ModelEntry:
    """A model found in the repository: its manifest and its folder."""

    manifest: Manifest
    path: Path

    def file(self, role: str) -> Path:
        return self.path / self.manifest.files[role].path


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split ``name[:version]``; version None means newest."""
    name, sep, version = ref.strip().partition(":")
    if not name:
        raise InvalidInput(f"model reference {ref!r} is empty; use NAME or NAME:VERSION")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidInput(
            f"model reference {ref!r}: version {version!r} must be a positive integer")
    return name, int(version)


class ModelRepository:
    """A folder of versioned models. Cheap to build; reads manifests lazily."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelNotFound(f"model repository {str(self.root)!r} is not a folder")
        # Parsed manifests by path, with the stat they were read under: a zoo manifest
        # with its tables takes ~8 ms to parse, and every request resolves a model.
        self._parsed: dict[Path, tuple[tuple[int, int, int], ModelEntry]] = {}

    def entries(self) -> list[ModelEntry]:
        """Every model version with a readable manifest, sorted by name then version."""
        found = [self.read_entry(mpath) for mpath in self.manifest_paths()]
        return sorted(found, key=lambda e: (e.manifest.name, e.manifest.version))

    def manifest_paths(self) -> list[Path]:
        """Every ``<name>/<version>/manifest.json`` under the root, sorted."""
        return sorted(self.root.glob("*/*/manifest.json"))

    def read_entry(self, mpath: Path) -> ModelEntry:
        """The entry of one manifest, parsed again only when its stat changed;
        ModelIntegrityError when it does not parse or sits in the wrong folder."""
        st = mpath.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._parsed.get(mpath)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        manifest = parse_manifest(mpath.read_bytes(), where=str(mpath))
        if mpath.parent.name != str(manifest.version) or mpath.parent.parent.name != manifest.name:
            raise ModelIntegrityError(
                f"{mpath} names {manifest.ref}, but sits in "
                f"{mpath.parent.parent.name}/{mpath.parent.name}")
        entry = ModelEntry(manifest=manifest, path=mpath.parent)
        self._parsed[mpath] = (stamp, entry)
        return entry

    def versions(self, name: str) -> list[ModelEntry]:
        """The versions of model ``name``, oldest first. Only its own folder is listed:
        listing the whole repository cost a worker ~1-2 ms per call and per stored chunk."""
        if name in (".", "..") or "/" in name or "\\" in name:
            return []  # not a folder of the root (nor a way out of it)
        pattern = f"{glob.escape(name)}/*/manifest.json"
        found = [self.read_entry(m) for m in sorted(self.root.glob(pattern))]
        return sorted(found, key=lambda e: e.manifest.version)

    def names(self) -> list[str]:
        return sorted({e.manifest.name for e in self.entries()})

    def resolve(self, ref: str) -> ModelEntry:
        """Find ``name[:version]`` (newest version when none is given), without verifying files."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"no model named {name!r} in {self.root}; available: {known}",
                                model=ref)
        if version is None:
            return versions[-1]
        for e in versions:
            if e.manifest.version == version:
                return e
        have = ", ".join(str(e.manifest.version) for e in versions)
        raise ModelNotFound(f"model {name!r} has no version {version}; versions: {have}",
                            model=ref)

    def load(self, ref: str) -> ModelEntry:
        """Resolve ``ref`` and verify every file's sha256 against the manifest."""
        entry = self.resolve(ref)
        verify_files(entry)
        return entry


def verify_files(entry: ModelEntry) -> None:
    """Raise ModelIntegrityError naming the first file whose digest differs from the manifest."""
    for role, f in entry.manifest.files.items():
        path = entry.path / f.path
        if not path.is_file():
            raise ModelIntegrityError(f"{entry.manifest.ref}: {role} file {path} is missing")
        actual = sha256_file(path)
        if actual != f.sha256:
            raise ModelIntegrityError(
                f"{entry.manifest.ref}: {path} has sha256 {actual[:16]}..., the manifest says "
                f"{f.sha256[:16]}...; the file was changed or damaged, re-export the model")


REGISTRY_FILE = "registry.json"


def read_registry(root: str | Path) -> list[dict[str, object]]:
    """Every model ever exported into ``root`` (name, version, manifest_sha256).

    The exporter appends to ``<root>/registry.json`` and never removes entries, so a
    code made by a model that was since deleted can still be named in the refusal.
    """
    import json

    path = Path(root) / REGISTRY_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return list(data["models"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelIntegrityError(f"{path} is not a valid model registry: {exc}") from None

