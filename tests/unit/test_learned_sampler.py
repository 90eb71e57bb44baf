"""A learned sampling prior (sampling kind "learned", a vae's or an ae's): export,
serving, validation.

A user's own sampler through ``export.custom``; a wrong one refused naming the tensor;
the sampling path through onnxruntime (shape, determinism for a seed, temperature); the
manifest rules of the kind; and the zoo's route: a tiny second stage trained for a few
steps on an exported vae's encoder latents, attached as a new version whose compression
is the base's byte for byte (``latentserve sampler``).
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from latentserve.cli import main
from latentserve.errors import InvalidInput, ModelIntegrityError
from latentserve.export.nets.models import LatentVAE
from latentserve.export.publish.custom import Factorized, export_model
from latentserve.export.publish.sampler import LearnedSampler, add_sampler, export_sampler
from latentserve.export.training.sampler import (
    SamplerConfig,
    TwoStageSampler,
    encoder_latents,
    method_for,
    train_sampler,
)
from latentserve.worker.runtime.manifest import parse_manifest
from latentserve.worker.runtime.model_check import check_model
from latentserve.worker.runtime.pipeline import Pipeline
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)
SHAPE = (3, 16, 16)
LATENT = (3, 4, 4)


def images(n: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, SHAPE[0], 1, 1))
    noise = rng.integers(-40, 40, (n, *SHAPE))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def conv_vae() -> tuple[nn.Module, nn.Module]:
    enc = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(), nn.Conv2d(8, 3, 4, 2, 1))
    dec = nn.Sequential(nn.ConvTranspose2d(3, 8, 4, 2, 1), nn.LeakyReLU(),
                        nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Sigmoid())
    return enc, dec


class FlatSampler(nn.Module):
    """A user's sampler: noise (N, d) -> a flat latent (N, C*h*w), linear (no bias), so
    scaling the noise by t scales the latent by t."""

    def __init__(self, d: int, out: int = int(np.prod(LATENT))) -> None:
        super().__init__()
        self.lin = nn.Linear(d, out, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        return self.lin(u)


class GridSampler(nn.Module):
    """Another: an MLP to (N, C, h, w) directly."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 48))

    def forward(self, u: Tensor) -> Tensor:
        return self.net(u).reshape(-1, *LATENT)


class BatchCentred(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inner = FlatSampler(d)

    def forward(self, u: Tensor) -> Tensor:
        return self.inner(u - u.mean(0, keepdim=True))


def export_vae(repo: Path, sampler: LearnedSampler | None, name: str = "v",
               x: np.ndarray | None = None) -> Path:
    torch.manual_seed(0)
    enc, dec = conv_vae()
    return export_model(family="vae", encoder=enc, decoder=dec,
                        images=images() if x is None else x, latent_model=Factorized(),
                        repo=repo, name=name, version=1, sampler=sampler)


@pytest.mark.parametrize("kind", ["flat", "grid"])
def test_a_user_sampler_is_exported_served_and_checked(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = FlatSampler(5) if kind == "flat" else GridSampler(5)
    folder = export_vae(tmp_path, LearnedSampler(module, 5, "my prior"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sampling"] == {"kind": "learned", "noise_dim": 5, "method": "my prior"}
    assert set(manifest["files"]) >= {"encoder", "decoder", "sampler", "check"}
    assert manifest["source"]["sampler"] == type(module).__name__
    pipe = Pipeline(tmp_path)
    runtime = pipe.runtime("v:1")
    assert runtime.sampler is not None and runtime.manifest.noise_dim == 5
    a = pipe.sample("v:1", 6, seed=3)
    assert a.shape == (6, *SHAPE) and a.dtype == np.uint8
    assert np.array_equal(a, pipe.sample("v:1", 6, seed=3))  # one seed, one set of images
    assert np.array_equal(a[2:], runtime.sample(4, seed=3, start=2))  # by index, not batch
    assert not np.array_equal(a, pipe.sample("v:1", 6, seed=4))
    # The latents are the sampler's outputs on u ~ N(0, I), times the temperature.
    lat = runtime.sample_latents(4, seed=3)
    with torch.no_grad():
        noise = np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, j])))
                          .standard_normal(5) for j in range(4)])
        want = module(torch.as_tensor(noise, dtype=torch.float32)).reshape(4, *LATENT)
    np.testing.assert_allclose(lat, want.numpy(), atol=1e-5)
    verdicts = {v.check: v for v in check_model(ModelRepository(tmp_path), "v:1", timing_s=0.05)}
    assert verdicts["parity"].status == "PASS" and "sampler_rel_diff" in verdicts["parity"].figures


def test_temperature_scales_the_noise(tmp_path: Path) -> None:
    export_vae(tmp_path, LearnedSampler(FlatSampler(4), 4))
    runtime = Pipeline(tmp_path).runtime("v:1")
    one = runtime.sample_latents(5, seed=0)
    half = runtime.sample_latents(5, seed=0, temperature=0.5)
    np.testing.assert_allclose(half, 0.5 * one, rtol=1e-5, atol=1e-6)  # a linear sampler
    with pytest.raises(InvalidInput, match="temperature"):
        runtime.sample(2, seed=0, temperature=0.0)


def test_without_a_sampler_a_vae_samples_from_the_standard_normal(tmp_path: Path) -> None:
    folder = export_vae(tmp_path, None)
    assert json.loads((folder / "manifest.json").read_text())["sampling"] == {"kind": "gaussian"}
    runtime = Pipeline(tmp_path).runtime("v:1")
    assert runtime.sampler is None
    lat = runtime.sample_latents(3, seed=2, temperature=0.5)
    want = np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence([2, j])))
                     .standard_normal(48) for j in range(3)]) * np.float32(0.5)
    np.testing.assert_allclose(lat.reshape(3, -1), want, rtol=1e-6)


WRONG = {
    "output-shape": (lambda: LearnedSampler(FlatSampler(4, out=7), 4),
                     "sampler output 'latent' is float32 (8, 7) for noise (8, 4); expected "
                     "float latents (8, 3, 4, 4)"),
    "noise-dim": (lambda: LearnedSampler(FlatSampler(4), 6),
                  "sampler fails on noise float32 (8, 6)"),
    "batch": (lambda: LearnedSampler(BatchCentred(4), 4),
              "sampler output 'latent' depends on the batch composition"),
    "zero-dim": (lambda: LearnedSampler(FlatSampler(4), 0), "noise_dim >= 1"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_a_wrong_sampler_is_refused_naming_the_tensor(case: str, tmp_path: Path) -> None:
    make, message = WRONG[case]
    with pytest.raises(InvalidInput) as err:
        export_vae(tmp_path, make())
    assert message in str(err.value)
    assert not (tmp_path / "v").exists()


def test_an_ae_sampler_gives_the_latent_that_is_rounded_and_decoded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc, dec = conv_vae()
    module = FlatSampler(4)
    with torch.no_grad():
        module.lin.weight.mul_(4.0)  # latents several steps wide, so rounding matters
    folder = export_model(family="ae", encoder=enc, decoder=dec, images=images(),
                          latent_model=Factorized(), repo=tmp_path, name="a", version=1,
                          sampler=LearnedSampler(module, 4, "mine"))
    assert _manifest(folder)["sampling"] == {"kind": "learned", "noise_dim": 4,
                                             "method": "mine"}
    runtime = Pipeline(tmp_path).runtime("a:1")
    with pytest.raises(InvalidInput, match="no continuous sampling latent"):
        runtime.sample_latents(2, seed=0)  # an ae's samples are rounded symbols

    def torch_latents(seed: int) -> np.ndarray:
        noise = np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, j])))
                          .standard_normal(4) for j in range(6)]).astype(np.float32)
        with torch.no_grad():
            out: np.ndarray = module(torch.as_tensor(noise)).reshape(6, *LATENT).numpy()
        return out

    # Exactness guard: torch's latents are compared with onnxruntime's after rounding, so
    # the seed used is the first whose latents all sit >= 1e-3 from a rounding boundary
    # (closer, another CPU's float noise could round them the other way).
    seed, want = next((s, w) for s in range(100) for w in [torch_latents(s)]
                      if np.abs(np.abs(w - np.floor(w)) - 0.5).min() >= 1e-3)
    got = runtime.sample(6, seed=seed)
    assert np.array_equal(got, runtime.decode(runtime.quantize(want)))
    assert np.array_equal(got[3:], runtime.sample(3, seed=seed, start=3))


def test_a_sampler_is_refused_for_a_vqvae_or_a_hyperprior_ae(tmp_path: Path) -> None:
    from latentserve.export.publish.custom import Hyperprior, VQCodebook

    enc, dec = conv_vae()
    for family, model in (("vqvae", VQCodebook(num_codes=8)),
                          ("ae", Hyperprior(hyper_encoder=nn.Identity(),
                                            hyper_decoder=nn.Identity()))):
        with pytest.raises(InvalidInput, match="sampler= takes a LearnedSampler"):
            export_model(family=family, encoder=enc, decoder=dec,  # type: ignore[arg-type]
                         images=images(), latent_model=model, repo=tmp_path, name="a",
                         version=1, sampler=LearnedSampler(FlatSampler(4), 4))


# -- the manifest's rules ----------------------------------------------------------------

def _manifest(folder: Path) -> dict[str, object]:
    raw: dict[str, object] = json.loads((folder / "manifest.json").read_text())
    return raw


BAD_SAMPLING = {
    "no-file": (lambda m: m["files"].pop("sampler"), "sampling kind 'learned' needs files.sampler"),
    "no-dim": (lambda m: m["sampling"].pop("noise_dim"), "an integer noise_dim >= 1, got None"),
    "bad-dim": (lambda m: m["sampling"].update(noise_dim=0), "an integer noise_dim >= 1, got 0"),
    "any-size-ae": (lambda m: m.update(family="ae", latent={"channels": 3}, image={
        "channels": 3, "size": "any", "stride": 4, "padding": "edge"}),
        "sampling kind 'learned' is for a vae or a fixed-size ae with code kind "
        "'factorized', not an any-size ae"),
    "unknown": (lambda m: m["sampling"].update(kind="flow"), "sampling kind 'flow' is not one of"),
    "file-not-learned": (lambda m: m["sampling"].update(kind="gaussian"),
                         "files names a 'sampler' but sampling kind is 'gaussian'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLING))
def test_the_manifest_refuses_a_bad_learned_sampling_block(case: str, tmp_path: Path) -> None:
    folder = export_vae(tmp_path, LearnedSampler(FlatSampler(4), 4))
    raw = _manifest(folder)
    assert parse_manifest(json.dumps(raw).encode()).noise_dim == 4
    edit, message = BAD_SAMPLING[case]
    edit(raw)  # type: ignore[no-untyped-call]
    with pytest.raises(ModelIntegrityError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_manifest(json.dumps(raw).encode())


# -- the zoo's route: a second stage on an exported vae, attached as a new version -------

def test_a_second_stage_trained_on_the_encoder_latents_keeps_compression(tmp_path: Path) -> None:
    x = images(32)
    base = export_vae(tmp_path, None, x=x)
    latents = encoder_latents(base / "encoder.onnx", x)
    assert latents.shape == (32, *LATENT)
    stage2, provenance = train_sampler(latents, SamplerConfig(
        u_dim=3, hidden=16, mixture=4, steps=40, batch_size=8, lr=1e-2, progress=False))
    assert provenance["num_latents"] == 32 and "gamma" in provenance["final"]
    assert stage2.noise_dim == provenance["noise_dim"] == 5  # u_dim + 2 with a mixture
    folder = add_sampler(base=base, repo=tmp_path, name="v", version=2, example_images=x[:4],
                         sampler=LearnedSampler(stage2, 5, "two-stage"),
                         provenance=provenance)
    old, new = _manifest(base), _manifest(folder)
    assert new["code"] == old["code"] and new["sampling"]["kind"] == "learned"  # type: ignore[index]
    for role in ("encoder", "decoder"):
        assert new["files"][role] == old["files"][role]  # type: ignore[index]
    assert new["training"]["sampler"]["config"]["u_dim"] == 3  # type: ignore[index]
    assert new["sampling"]["noise_dim"] == 5  # type: ignore[index]
    pipe = Pipeline(tmp_path)
    c1, c2 = pipe.compress("v:1", x), pipe.compress("v:2", x)
    # The same payloads; only the header's manifest fingerprint differs.
    assert [len(a) for a in c1] == [len(b) for b in c2]
    assert np.array_equal(pipe.reconstruct(c1), pipe.reconstruct(c2))
    assert pipe.sample("v:2", 5, seed=0).shape == (5, *SHAPE)
    verdicts = check_model(ModelRepository(tmp_path), "v:2", timing_s=0.05)
    assert [v.check for v in verdicts if v.status == "FAIL"] == [], verdicts
    with pytest.raises(InvalidInput, match="already exists"):
        add_sampler(base=base, repo=tmp_path, name="v", version=2, example_images=x[:4],
                    sampler=LearnedSampler(stage2, 5))


def test_the_mixture_picks_its_component_whatever_the_temperature() -> None:
    stage2 = LatentVAE(6, 8, 2)
    mixture = {"weights": [0.2, 0.3, 0.5], "means": [[-3.0, 0.0], [0.0, 3.0], [3.0, 3.0]],
               "stds": [[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]]}
    sampler = TwoStageSampler(stage2, mixture).eval()
    assert sampler.noise_dim == 4
    noise = torch.as_tensor(np.random.default_rng(0).standard_normal((4000, 4)),
                            dtype=torch.float32)

    def picked(x: Tensor) -> tuple[Tensor, Tensor]:
        uniform = torch.atan(x[:, 0] / x[:, 1]) / np.pi + 0.5
        c = (uniform[:, None] > sampler.cdf[None]).sum(1)
        return c, sampler.means[c] + sampler.stds[c] * x[:, 2:]

    c1, u1 = picked(noise)
    c2, u2 = picked(noise * 0.5)
    assert torch.equal(c1, c2)  # the temperature scales the spread only
    torch.testing.assert_close(u2 - sampler.means[c2], 0.5 * (u1 - sampler.means[c1]))
    share = torch.bincount(c1, minlength=3).double() / len(c1)
    assert torch.allclose(share, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), atol=0.03)
    with torch.no_grad():
        torch.testing.assert_close(sampler(noise), stage2.dec(u1))


def test_weights_that_are_exact_halves_are_stored_as_float16(tmp_path: Path) -> None:
    import onnx

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 96), nn.ReLU(), nn.Linear(96, 48))
    sizes = {}
    for half in (False, True):
        if half:
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(p.half().float())
        path = tmp_path / f"s{half}.onnx"
        diff = export_sampler(LearnedSampler(module, 4), LATENT, path)
        assert diff <= 1e-6
        kinds = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
        # Only the 96 x 48 weight (4,608 values) is large enough; only rounded ones move.
        assert (onnx.TensorProto.FLOAT16 in kinds.values()) == half
        sizes[half] = path.stat().st_size
    assert sizes[True] < sizes[False] - 8000


def _write_idx(path: Path, x: np.ndarray) -> None:
    n, _, h, w = x.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + x[:, 0].tobytes())


@pytest.mark.parametrize("family", ["vae", "ae"])
def test_the_sampler_command_writes_the_new_version(family: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    gray = images(40)[:, :1]
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 4, 4))
    dec = nn.Sequential(nn.ConvTranspose2d(4, 1, 4, 4), nn.Sigmoid())
    base = export_model(family=family, encoder=enc, decoder=dec,  # type: ignore[arg-type]
                        images=gray[:30],
                        latent_model=Factorized(), repo=tmp_path, name="g", version=1)
    _write_idx(tmp_path / "images-idx3-ubyte.gz", gray)
    args = ["sampler", str(base), "--models", str(tmp_path), "--name", "g", "--version", "2",
            "--data", str(tmp_path / "images-idx3-ubyte.gz"), "--val-count", "10",
            "--u-dim", "2", "--hidden", "8", "--mixture", "3", "--steps", "5",
            "--threads", "1", "--no-progress"]
    assert main(args) == 0
    assert "wrote g:2" in capsys.readouterr().out
    sampling = Pipeline(tmp_path).runtime("g:2").manifest.sampling
    assert sampling["noise_dim"] == 4 and sampling["method"] == method_for(family)
    assert ("continuous latents before rounding" in sampling["method"]) == (family == "ae")
    # Data the base was not trained on is refused.
    args[args.index("--val-count") + 1] = "5"
    args[args.index("--version") + 1] = "3"
    assert main(args) == 1
    assert "is not what g:1 was trained on" in capsys.readouterr().err


def export_ae(repo: Path, x: np.ndarray) -> Path:
    torch.manual_seed(0)
    enc, dec = conv_vae()
    return export_model(family="ae", encoder=enc, decoder=dec, images=x,
                        latent_model=Factorized(), repo=repo, name="a", version=1)


def test_an_ae_version_derived_with_a_sampler_keeps_its_files_byte_for_byte(
        tmp_path: Path) -> None:
    x = images(32)
    base = export_ae(tmp_path / "base", x)
    assert _manifest(base)["sampling"]["kind"] == "gmm"  # type: ignore[index]
    latents = encoder_latents(base / "encoder.onnx", x)
    config = SamplerConfig(u_dim=3, hidden=16, mixture=4, steps=40, batch_size=8, lr=1e-2,
                           progress=False)
    stage2, provenance = train_sampler(latents, config)
    folder = add_sampler(base=base, repo=tmp_path / "new", name="a", version=1,
                         example_images=x[:4], sampler=LearnedSampler(stage2, 5, "two-stage"),
                         provenance=provenance)
    old, new = _manifest(base), _manifest(folder)
    for role in ("encoder", "decoder"):
        path = new["files"][role]["path"]  # type: ignore[index]
        assert (folder / path).read_bytes() == (base / path).read_bytes()
    assert new["code"] == old["code"] and new["family"] == "ae"
    assert new["sampling"] == {"kind": "learned", "noise_dim": 5, "method": "two-stage"}
    assert new["source"]["derived_from"] == "a:1"  # type: ignore[index]
    base_pipe, pipe = Pipeline(tmp_path / "base"), Pipeline(tmp_path / "new")
    c1, c2 = base_pipe.compress("a:1", x), pipe.compress("a:1", x)
    assert [len(a) for a in c1] == [len(b) for b in c2]
    assert np.array_equal(base_pipe.reconstruct(c1), pipe.reconstruct(c2))
    # Deterministic per seed and index, whatever the batch.
    a = pipe.sample("a:1", 6, seed=2)
    assert a.shape == (6, *SHAPE) and np.array_equal(a, pipe.sample("a:1", 6, seed=2))
    assert np.array_equal(a[4:], pipe.runtime("a:1").sample(2, seed=2, start=4))
    verdicts = check_model(ModelRepository(tmp_path / "new"), "a:1", timing_s=0.05)
    assert [v.check for v in verdicts if v.status == "FAIL"] == [], verdicts
    # Training is seeded: the same latents and config give the same sampler weights.
    again, _ = train_sampler(latents, config)
    for p, q in zip(stage2.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_add_sampler_refuses_an_any_size_ae(tmp_path: Path) -> None:
    raw = _manifest(export_ae(tmp_path, images()))
    raw.update(latent={"channels": 3}, sampling={"kind": "none"},
               image={"channels": 3, "size": "any", "stride": 4, "padding": "edge"})
    base = tmp_path / "q" / "1"
    base.mkdir(parents=True)
    (base / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(InvalidInput, match="an any-size ae model with code kind 'factorized'; "
                                           "a learned sampler is for a fixed-size vae"):
        add_sampler(base=base, repo=tmp_path / "new", name="q", version=1,
                    example_images=images(4), sampler=LearnedSampler(FlatSampler(4), 4))
