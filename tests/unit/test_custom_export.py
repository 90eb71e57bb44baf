"""export.custom: user-defined architectures of every family, and every contract violation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from latentserve.errors import InvalidInput
from latentserve.export.nets.prior import PixelCNNPrior, PriorConfig
from latentserve.export.publish.custom import Factorized, VQCodebook, export_model
from latentserve.worker.runtime.model_check import check_model
from latentserve.worker.runtime.pipeline import Pipeline
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)


def images(shape: tuple[int, int, int], n: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, shape[0], 1, 1))
    noise = rng.integers(-40, 40, (n, *shape))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# -- user architectures (none of them is the zoo's trunk) -----------------------------------

class LogisticDensity(nn.Module):
    """A user's own factorised density: a per-channel logistic, ``likelihood`` only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def likelihood(self, y: Tensor) -> Tensor:
        s = self.log_scale.exp()[None, :, None, None]
        return torch.sigmoid((y + 0.5) / s) - torch.sigmoid((y - 0.5) / s)


class MLPEncoder(nn.Module):
    """uint8 pixels in (it divides by 255 itself) -> a flat (N, D) latent."""

    def __init__(self, shape: tuple[int, int, int], dim: int, out_scale: float = 4.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 32), nn.Tanh(),
                                 nn.Linear(32, dim))
        self.out_scale = out_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float() / 255.0) * self.out_scale


class MLPDecoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        self.shape = shape
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, int(np.prod(shape))))

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.net(z)).reshape(-1, *self.shape)


class ConvVAEEncoder(nn.Module):
    """Returns (mu, logvar), as VAE code usually does; batch norm left in training mode."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU(),
                                  nn.Conv2d(8, 6, 3, 2, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.body(x).chunk(2, 1)
        return mu * 3, logvar


class Codebook(nn.Module):
    def __init__(self, k: int, d: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(k, d))


class VQEncoder(nn.Module):
    def __init__(self, c: int, book: Codebook, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, book.embed.shape[1], stride, stride)
        self.book = book

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x).permute(0, 2, 3, 1)
        return ((z[..., None, :] - self.book.embed) ** 2).sum(-1).argmin(-1)


class VQDecoder(nn.Module):
    def __init__(self, c: int, book: Codebook, stride: int) -> None:
        super().__init__()
        self.book = book
        self.up = nn.ConvTranspose2d(book.embed.shape[1], c, stride, stride)

    def forward(self, idx: Tensor) -> Tensor:
        return torch.sigmoid(self.up(self.book.embed[idx].permute(0, 3, 1, 2)))


class ShiftPrior(nn.Module):
    """A user's causal prior: logits at p from the index at p - 1 (raster order)."""

    def __init__(self, k: int, out: int | None = None) -> None:
        super().__init__()
        self.k, self.out = k, out or k
        self.table = nn.Embedding(k + 1, self.out)

    def forward(self, idx: Tensor) -> Tensor:
        n, h, w = idx.shape
        flat = idx.reshape(n, -1)
        prev = torch.cat([torch.full_like(flat[:, :1], self.k), flat[:, :-1]], 1)
        return self.table(prev).reshape(n, h, w, self.out).permute(0, 3, 1, 2)


def conv_ae(c: int) -> tuple[nn.Module, nn.Module]:
    enc = nn.Sequential(nn.Conv2d(c, 8, 4, 2, 1), nn.LeakyReLU(), nn.Conv2d(8, 3, 4, 2, 1))
    dec = nn.Sequential(nn.ConvTranspose2d(3, 8, 4, 2, 1), nn.LeakyReLU(),
                        nn.ConvTranspose2d(8, c, 4, 2, 1))
    return enc, dec


def _round_trip(repo: Path, ref: str, x: np.ndarray) -> None:
    pipe = Pipeline(repo)
    codes = pipe.compress(ref, x)
    back = pipe.reconstruct(codes)
    assert back.shape == x.shape and back.dtype == np.uint8
    runtime = pipe.runtime(ref)
    assert np.array_equal(runtime.encode(back[:0]), runtime.encode(x[:0]))
    verdicts = check_model(ModelRepository(repo), ref, timing_s=0.05)
    assert [v.check for v in verdicts if v.status == "FAIL"] == [], verdicts
    assert {v.check for v in verdicts if v.status == "PASS"} >= {
        "digests", "parity", "round trip", "batch invariance", "code size"}


CASES = {
    # family, shape, builder -> (kwargs of export_model)
    "ae-conv-own-density": ("ae", (1, 16, 16), lambda: dict(
        encoder=conv_ae(1)[0], decoder=conv_ae(1)[1],
        latent_model=Factorized(density=LogisticDensity(3)))),
    "ae-mlp-uint8-flat": ("ae", (3, 8, 8), lambda: dict(
        encoder=MLPEncoder((3, 8, 8), 6), decoder=MLPDecoder((3, 8, 8), 6),
        latent_model=Factorized(), encoder_input="uint8")),
    "vae-conv-tuple": ("vae", (3, 16, 16), lambda: dict(
        encoder=ConvVAEEncoder(3), decoder=conv_ae(3)[1], latent_model=Factorized())),
    "vae-mlp-12px": ("vae", (1, 12, 12), lambda: dict(
        encoder=MLPEncoder((1, 12, 12), 5, 1.0), decoder=MLPDecoder((1, 12, 12), 5),
        latent_model=Factorized(step=0.25), encoder_input="uint8")),
}


def _vq(c: int, stride: int, k: int, prior: nn.Module | None) -> dict[str, object]:
    book = Codebook(k, 4)
    return dict(encoder=VQEncoder(c, book, stride), decoder=VQDecoder(c, book, stride),
                latent_model=VQCodebook(k, prior=prior))


CASES |= {
    "vqvae-static": ("vqvae", (3, 16, 16), lambda: _vq(3, 4, 16, None)),
    "vqvae-shift-prior": ("vqvae", (1, 12, 12), lambda: _vq(1, 3, 8, ShiftPrior(8))),
    "vqvae-pixelcnn": ("vqvae", (3, 8, 8), lambda: _vq(3, 2, 8, PixelCNNPrior(PriorConfig(
        num_codes=8, grid=(4, 4), embed_dim=8, hidden=8, layers=1, dropout=0.0)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_architectures_export_serve_and_check(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    family, shape, build = CASES[case]
    x = images(shape)
    folder = export_model(family=family, images=x, repo=tmp_path, name=case, version=1,
                          **build())  # type: ignore[arg-type]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["image"] == {**manifest["image"], "channels": shape[0], "height": shape[1],
                                 "width": shape[2]}
    assert set(manifest["files"]) >= {"encoder", "decoder", "check"}
    assert manifest["quality"]["onnx_max_abs_diff"] <= 1e-4
    if family == "vqvae":
        assert manifest["code"]["kind"] == ("vq_static" if case == "vqvae-static" else "vq_prior")
        assert ("prior_step" in manifest["files"]) == (case == "vqvae-pixelcnn")
    if "mlp" in case:
        assert manifest["latent"]["shape"][1:] == [1, 1]
        assert manifest["source"]["fully_convolutional"] is False
    _round_trip(tmp_path, f"{case}:1", x)
    sample = Pipeline(tmp_path).sample(f"{case}:1", 3, seed=1)
    assert sample.shape == (3, *shape)


# -- contract violations ---------------------------------------------------------------------

class BatchMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(0, keepdim=True)


class FloatVQ(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class NonCausal(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, idx: Tensor) -> Tensor:
        total = idx.float().flatten(1).sum(1)[:, None, None, None]
        ramp = torch.linspace(0, 1, self.k)[None, :, None, None]
        return total.expand(-1, self.k, *idx.shape[1:]) * ramp


class Crash(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], 3, -1, 5)  # 16 x 16 is not a multiple of 5 in that way


def _ae(**kw: object) -> dict[str, object]:
    enc, dec = conv_ae(1)
    return {"family": "ae", "encoder": enc, "decoder": dec, "latent_model": Factorized(), **kw}


def _vqk(prior: nn.Module | None, k: int = 16) -> dict[str, object]:
    return {"family": "vqvae", **_vq(1, 4, k, prior)}


VIOLATIONS = {
    "batch-composition": (lambda: _ae(encoder=nn.Sequential(conv_ae(1)[0], BatchMean())),
                          "encoder output 'latent' depends on the batch composition"),
    "vq-float-output": (lambda: {**_vqk(None), "encoder": FloatVQ()},
                        "encoder output 'indices' is float32"),
    "latent-rank": (lambda: _ae(encoder=FloatVQ()),
                    "must give a float latent (N, C, h, w)"),
    "decoder-shape": (lambda: _ae(decoder=nn.ConvTranspose2d(3, 1, 2, 2)),
                      "decoder output 'image' is float32 (8, 1, 8, 8); expected float "
                      "images (8, 1, 16, 16)"),
    "encoder-crash": (lambda: _ae(encoder=Crash()), "encoder fails on images uint8"),
    "prior-not-causal": (lambda: _vqk(NonCausal(16)),
                         "prior output 'logits' is not causal in raster order"),
    "prior-wrong-k": (lambda: _vqk(ShiftPrior(16, out=8)),
                      "prior output 'logits' is float32 (8, 8, 4, 4); expected float logits "
                      "(8, 16, 4, 4)"),
    "indices-beyond-codebook": (lambda: {**_vqk(None, k=16), "latent_model": VQCodebook(2)},
                                "encoder output 'indices' reaches"),
    "wrong-latent-model": (lambda: _ae(latent_model=VQCodebook(4)),
                           "a ae takes latent_model=Factorized(...)"),
    "density-step": (lambda: _ae(latent_model=Factorized(density=LogisticDensity(3), step=0.5)),
                     "step must be 1"),
    "nan-latent": (lambda: _ae(encoder=nn.Sequential(conv_ae(1)[0], nn.Softplus(), Log0())),
                   "encoder output 'latent' holds NaN or infinite values"),
}


class Log0(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x * 0)


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_contract_violations_name_the_tensor(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    make, message = VIOLATIONS[case]
    with pytest.raises(InvalidInput) as err:
        export_model(images=images((1, 16, 16)), repo=tmp_path, name="bad", version=1,
                     **make())  # type: ignore[arg-type]
    assert message in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_bad_images_and_existing_version_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="images must be uint8"):
        export_model(images=images((1, 16, 16)).astype(np.float32), repo=tmp_path, name="a",
                     version=1, **_ae())  # type: ignore[arg-type]
    export_model(images=images((1, 16, 16)), repo=tmp_path, name="a", version=1, **_ae())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="already exists"):
        export_model(images=images((1, 16, 16)), repo=tmp_path, name="a", version=1, **_ae())  # type: ignore[arg-type]
    registry = json.loads((tmp_path / "registry.json").read_text())["models"]
    assert [(m["name"], m["version"]) for m in registry] == [("a", 1)]
