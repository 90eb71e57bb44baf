"""Provider selection and IO binding in the onnxruntime engine (CPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from latentserve.errors import InvalidInput, ProviderUnavailable
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
from latentserve.worker.runtime.repository import ModelRepository


@pytest.mark.parametrize("model", ["tiny-ae", "tiny-vae", "tiny-vqvae"])
def test_io_binding_gives_the_same_tensors_as_numpy_runs(
        tiny_repo: Path, mnist_images: np.ndarray, model: str) -> None:
    entry = ModelRepository(tiny_repo).load(model)
    plain = ModelRuntime(entry, EngineConfig(io_binding="off"))
    bound = ModelRuntime(entry, EngineConfig(io_binding="on", max_batch=5))
    assert plain.io_device is None and bound.io_device == "cpu"
    images = mnist_images[:12]
    symbols = plain.encode(images)
    np.testing.assert_array_equal(bound.encode(images), symbols)
    np.testing.assert_array_equal(bound.decode(symbols), plain.decode(symbols))
    np.testing.assert_array_equal(bound.sample(6, seed=3), plain.sample(6, seed=3))


def test_auto_binds_only_on_a_gpu_provider(tiny_repo: Path) -> None:
    runtime = ModelRuntime(ModelRepository(tiny_repo).load("tiny-ae"), EngineConfig())
    assert runtime.provider == "CPUExecutionProvider" and runtime.io_device is None
    with pytest.raises(InvalidInput, match="io_binding 'sometimes'"):
        EngineConfig(io_binding="sometimes")  # type: ignore[arg-type]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this machine has CUDA")
def test_a_missing_cuda_provider_is_a_clear_startup_error_unless_auto(tiny_repo: Path) -> None:
    entry = ModelRepository(tiny_repo).load("tiny-ae")
    with pytest.raises(ProviderUnavailable, match="provider 'cuda' requested.*--provider cpu"):
        ModelRuntime(entry, EngineConfig(provider="cuda"))
    assert ModelRuntime(entry, EngineConfig(provider="auto")).provider == "CPUExecutionProvider"
