"""Settings of a runtime in this process: which model repository, which provider.

Apart from the engine so that configuration can name providers without importing
onnxruntime. ``RuntimeSettings`` is what every command that runs models in process
(``compress --local``, ``models``, ``models check``, ``eval``, ``demo``) reads; the
server's and the worker's configurations have the same two fields, spelled the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latentserve.errors import InvalidInput
from latentserve.settings import Settings, setting

Provider = Literal["cpu", "cuda", "tensorrt", "auto"]
PROVIDERS: tuple[Provider, ...] = ("cpu", "cuda", "tensorrt", "auto")
REPOSITORY_HELP = "model repository folder (<name>/<version>/manifest.json ...)"


@dataclass(frozen=True)
class RuntimeSettings(Settings):
    """The model repository and the onnxruntime provider of an in-process runtime."""

    models: Path = setting(Path("models"), aliases=("--repo",), metavar="DIR",
                           help=REPOSITORY_HELP)
    provider: Provider = setting("cpu", help="onnxruntime execution provider")

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", Path(self.models))
        if self.provider not in PROVIDERS:
            raise InvalidInput(f"provider {self.provider!r} is not one of {PROVIDERS}")
