"""``python tests/gated_worker.py REDIS_URL GATE_NAME worker FLAGS...``: the real
``latentserve worker`` whose pipeline calls each wait at the test's gate (tests/gate.py),
so a test can hold a worker process mid-chunk for as long as it needs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate import Gate, GatedPipeline  # noqa: E402
from latentserve.cli import main  # noqa: E402
from latentserve.worker.jobqueue import consumer  # noqa: E402
from latentserve.worker.jobqueue.store import connect  # noqa: E402


def run(gate_url: str, gate_name: str, argv: list[str]) -> int:
    gate = Gate(connect(gate_url), gate_name)
    real = consumer.create_worker

    def gated(config: Any, pipeline: Any = None, client: Any = None) -> Any:
        worker = real(config, pipeline, client)
        worker.pipeline = GatedPipeline(worker.pipeline, gate)
        return worker

    consumer.create_worker = gated  # type: ignore[assignment]
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
