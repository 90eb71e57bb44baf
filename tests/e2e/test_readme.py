"""The README's Python example runs as written against a real server on the shipped zoo."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import create_server
from latentserve.service.server.config import ServiceConfig
from latentserve.worker.runtime.images import list_image_files, read_image_file

ROOT = Path(__file__).resolve().parents[2]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_python_example_against_the_shipped_zoo() -> None:
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README has no Python example"
    config = ServiceConfig(jobs=JobSettings.off(),
                           host="127.0.0.1", port=0, metrics_port=None, models=ROOT / "models",
                           grace_s=1.0)
    server, port = create_server(config)
    server.start()
    try:
        images = np.stack([read_image_file(f, (1, 28, 28))
                           for f in list_image_files(ROOT / "examples" / "digits")[:8]])
        scope: dict[str, object] = {"images": images}
        for block in blocks:
            exec(compile(block.replace("localhost:50051", f"127.0.0.1:{port}"),
                         "README.md", "exec"), scope)
    finally:
        server.stop(1.0).wait()
    codes, back, samples = scope["codes"], scope["images_back"], scope["samples"]
    assert len(codes) == 8 and all(8 < len(c) < 80 for c in codes)  # type: ignore[arg-type]
    back = np.stack(back)  # type: ignore[arg-type]
    assert back.shape == images.shape and back.dtype == np.uint8
    mse = ((back.astype(float) - images.astype(float)) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / mse) > 22  # a real reconstruction, not noise
    assert len(samples) == 16  # type: ignore[arg-type]
