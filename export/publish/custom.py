"""Export your own torch AE / VAE / VQ-VAE: ``export_model`` (walkthrough: docs/your-own-model.md).

    from latentserve.export.publish import custom
    custom.export_model(family="ae", encoder=enc, decoder=dec, images=samples,
                        latent_model=custom.Factorized(), repo="models", name="my-ae", version=1)

You give an encoder, a decoder and one of the supported latent models; the exporter
wraps them into the I/O contract of ``latentserve.worker.runtime.manifest``, checks that
contract on your modules (``export.contract``), exports ONNX with a dynamic batch axis,
checks onnxruntime against torch, freezes the integer tables and writes a repository
version with digests, exactly as the zoo is written (``export.writer``)::

    uint8 image -> [x / 255 unless encoder_input="uint8"] -> your encoder -> latent (N, C, h, w)
        ((N, D) is served as (N, D, 1, 1)) or indices (N, h, w) -> your decoder -> clamp [0, 1]

Latent models: ``Factorized`` (ae / vae; a histogram of the sample images' latents, or
your own density), ``Hyperprior`` (ae; a Balle-2018 scale hyperprior: your h_a and h_s,
code kind ``hyperprior``), ``VQCodebook`` (vqvae; static per-position tables, or your
causal prior). A vae samples from N(0, I), or with ``sampler=LearnedSampler(module,
noise_dim)`` from your learned sampling prior: noise (N, d) ~ N(0, I) -> latent (N, C, h, w)
(or flat (N, C*h*w)), exported as ``sampler.onnx`` (``export.sampler``; e.g. the second
stage of a two-stage VAE, ``export.training.sampler.train_sampler``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn

from latentserve.errors import InvalidInput
from latentserve.export.publish import contract
from latentserve.export.publish.exporter import (
    OPSET,
    PARITY_TOLERANCE,
    ExportParityError,
    onnx_export,
)
from latentserve.export.publish.sampler import (
    SAMPLER_FILE,
    LearnedSampler,
    SamplerWrapper,
    check_sampler,
    export_sampler,
    learned_sampling,
    torch_run,
)
from latentserve.export.publish.writer import DEFAULT_VAE_STEP, LatentCoding, write_version

Family = Literal["ae", "vae", "vqvae"]
EncoderInput = Literal["float", "uint8"]


@dataclass(frozen=True)
class Factorized:
    """ae / vae: each latent channel coded under its own integer table.

    ``symbol = round(latent / step)``. ``density`` None: the tables are the histograms of
    the sample images' symbols (smoothed). Otherwise a module over the rounded latent
    (step 1) with ``pmf_table(lo, hi) -> [pmf per channel]`` (as
    ``export.entropy_model.FactorizedDensity``) or ``likelihood(y (N, C, h, w)) -> mass of
    [y - 1/2, y + 1/2]``. ``step`` None: 1 for an ae, 0.5 for a vae.
    """

    density: nn.Module | None = None
    step: float | None = None


@dataclass(frozen=True)
class VQCodebook:
    """vqvae: ``num_codes`` codebook entries; the encoder gives their indices (N, h, w).

    ``prior`` None: indices coded under static per-position tables fitted on the sample
    images (code kind ``vq_static``; sampling draws from those tables). Otherwise a
    module ``indices (N, h, w) int64 -> logits (N, K, h, w)``, causal in raster order
    (code kind ``vq_prior``); a ``PixelCNNPrior`` also gets its one-step graph.
    """

    num_codes: int
    prior: nn.Module | None = None


@dataclass(frozen=True)
class Hyperprior:
    """ae: a scale hyperprior (Balle 2018; code kind ``hyperprior``, docs/code-format.md).

    ``hyper_encoder`` (h_a): the rounded latent y_hat (N, C, h, w) float -> z (N, Cz, hz,
    wz); ``hyper_decoder`` (h_s): the rounded z -> scales (N, C, h, w), > 0 (end it with
    softplus or exp). Each y symbol is coded under the fixed integer Gaussian table its
    scale picks (64 scales from 0.11 to 256); z under factorized tables: ``density``'s
    (as ``Factorized.density``) or, when None, the sample images' histogram. The latent
    step is 1 (train with y + uniform noise or straight-through rounding). Fixed-size
    images only. h_a sees y_hat, not the encoder's float y, so the code is a function
    of the symbols alone.
    """

    hyper_encoder: nn.Module
    hyper_decoder: nn.Module
    density: nn.Module | None = None


LatentModel = Factorized | VQCodebook | Hyperprior


class EncoderWrapper(nn.Module):
    """uint8 image -> the user's encoder -> the contract's ``latent`` or ``indices``."""

    def __init__(self, encoder: nn.Module, family: Family, encoder_input: EncoderInput) -> None:
        super().__init__()
        self.encoder, self.family, self.encoder_input = encoder, family, encoder_input

    def forward(self, image: Tensor) -> Tensor:
        x = image.float() / 255.0 if self.encoder_input == "float" else image
        out = self.encoder(x)
        if isinstance(out, (tuple, list)):  # a vae's (mu, logvar): serve the mean
            out = out[0]
        z: Tensor = out
        if self.family == "vqvae":
            # Float "indices" stay float, so the contract check refuses them by name.
            return z if z.dtype.is_floating_point else z.long()
        return z[:, :, None, None] if z.dim() == 2 else z


class DecoderWrapper(nn.Module):
    """The contract's ``latent`` / ``indices`` -> the user's decoder -> image in [0, 1]."""

    def __init__(self, decoder: nn.Module, flat: bool) -> None:
        super().__init__()
        self.decoder, self.flat = decoder, flat

    def forward(self, z: Tensor) -> Tensor:
        image: Tensor = self.decoder(z.flatten(1) if self.flat else z)
        return image.clamp(0.0, 1.0)


class _Likelihood(Protocol):
    """A user density without pmf_table: masses of (1, C, 1, W) latent values."""

    def likelihood(self, y: Tensor) -> Tensor: ...


def _density_fit(density: nn.Module) -> Any:
    """The factorized spec from a user density (step 1) over the symbols' support."""
    from latentserve.export.publish import tables

    def fit(symbols: np.ndarray) -> dict[str, Any]:
        if hasattr(density, "pmf_table"):
            return tables.ae_tables(cast(tables.PmfTable, density), symbols)
        if not hasattr(density, "likelihood"):
            raise InvalidInput(f"density {type(density).__name__} has neither pmf_table(lo, hi) "
                               "nor likelihood(y)")
        c = symbols.shape[1]
        per = symbols.transpose(1, 0, 2, 3).reshape(c, -1)
        lo, hi = per.min(1), per.max(1)
        width = int((hi - lo).max()) + 1
        grid = lo[:, None] + np.minimum(np.arange(width)[None], (hi - lo)[:, None])
        with torch.no_grad():
            y = torch.as_tensor(grid, dtype=torch.float32)[None, :, None]
            raw = cast(_Likelihood, density).likelihood(y)
        mass = np.asarray(raw, np.float64).reshape(c, width)
        if mass.shape != (c, width) or not np.all(np.isfinite(mass)) or mass.min() < 0:
            raise InvalidInput("density.likelihood must give finite masses >= 0 of the latent's "
                               f"shape; got {mass.shape} for ({c}, {width})")
        freqs = [tables.quantize_pmf(mass[i, :int(hi[i] - lo[i]) + 1] + 1e-12) for i in range(c)]
        return {"step": 1.0, "offsets": [int(v) for v in lo], "freqs": freqs}
    return fit


def _fully_convolutional(encoder: nn.Module, example: Tensor, latent: Tensor) -> bool:
    """Whether the encoder also takes twice the image size (its latent grid growing with it)."""
    big = torch.nn.functional.interpolate(example[:1].float(), scale_factor=2.0).to(example.dtype)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out: Tensor = encoder(big)
    except Exception:  # noqa: BLE001 - a fixed-size layer (Linear) refuses: not convolutional
        return False
    return out.dim() == latent.dim() and out.shape[-1] == 2 * latent.shape[-1]


def _parity(family: Family, modules: dict[str, nn.Module], images: np.ndarray) -> Any:
    def parity(folder: Path) -> float:
        import onnxruntime as ort

        diffs: dict[str, float] = {}
        x = images[:8]
        feed: np.ndarray = x
        latent: np.ndarray | None = None
        for role in ("encoder", "decoder", "prior", "hyper_encoder", "hyper_decoder"):
            if role not in modules:
                continue
            sess = ort.InferenceSession(str(folder / f"{role}.onnx"),
                                        providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            if role == "hyper_encoder":
                feed = latent  # type: ignore[assignment]
            got = sess.run(None, {name: feed})[0]
            want = torch_run(modules[role])(feed)
            if role == "hyper_encoder":
                feed = np.rint(want).astype(np.float32)
            if role == "encoder" and family == "vqvae":
                if not np.array_equal(got, want):
                    raise ExportParityError(
                        f"encoder.onnx gives other indices than torch at "
                        f"{int((got != want).sum())} of {want.size} positions")
                diffs[role] = 0.0
            else:
                diffs[role] = float(np.abs(got - want).max())
            if role == "encoder":
                feed = (want.astype(np.int64) if family == "vqvae"
                        else np.rint(want).astype(np.float32))
                latent = feed
        worst = max(diffs.values())
        if not worst <= PARITY_TOLERANCE:
            raise ExportParityError(
                "onnxruntime differs from torch by "
                + ", ".join(f"{r} {d:.3g}" for r, d in diffs.items())
                + f"; the limit is {PARITY_TOLERANCE}")
        return worst
    return parity


def export_model(*, family: Family, encoder: nn.Module, decoder: nn.Module,
                 images: np.ndarray, latent_model: LatentModel, repo: str | Path, name: str,
                 version: int, encoder_input: EncoderInput = "float",
                 val_images: np.ndarray | None = None, gmm_components: int = 10,
                 seed: int = 0, sampler: LearnedSampler | None = None,
                 overwrite: bool = False) -> Path:
    """Check, export and write your model as ``<repo>/<name>/<version>/``; returns the folder.

    ``images``: uint8 (N, C, H, W) sample images (N >= 2): they fix the image shape, the
    example input of the ONNX trace, and the integer tables. ``encoder_input``: "float"
    (the encoder takes x / 255 in [0, 1]) or "uint8" (it takes the pixels as they come).
    ``sampler`` (vae, or ae with ``Factorized``): your learned sampling prior, noise ->
    the continuous latent (an ae's is rounded before decoding, as its encoder's is); None
    samples from N(0, I) (vae) or a Gaussian mixture fitted to the latents (ae).
    Contract violations raise InvalidInput naming the tensor and what was expected.
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) < 2:
        raise InvalidInput(f"images must be uint8 (N, C, H, W) with N >= 2, got "
                           f"{images.dtype} {tuple(images.shape)}")
    if family not in ("ae", "vae", "vqvae"):
        raise InvalidInput(f"family {family!r} is not one of ae, vae, vqvae")
    want: tuple[type, ...] = ((VQCodebook,) if family == "vqvae" else
                              (Factorized, Hyperprior) if family == "ae" else (Factorized,))
    if not isinstance(latent_model, want):
        raise InvalidInput(f"a {family} takes latent_model="
                           f"{' or '.join(w.__name__ + '(...)' for w in want)}, got "
                           f"{type(latent_model).__name__}")
    if sampler is not None and (family == "vqvae" or not isinstance(sampler, LearnedSampler)
                                or isinstance(latent_model, Hyperprior)):
        raise InvalidInput(f"sampler= takes a LearnedSampler(module, noise_dim) for a vae or "
                           f"an ae with latent_model=Factorized(...); got "
                           f"{type(sampler).__name__} for a {family} with "
                           f"{type(latent_model).__name__}")
    if encoder_input not in ("float", "uint8"):
        raise InvalidInput(f"encoder_input {encoder_input!r} is not 'float' or 'uint8'")
    for module in (encoder, decoder, getattr(latent_model, "prior", None),
                   getattr(latent_model, "density", None),
                   getattr(latent_model, "hyper_encoder", None),
                   getattr(latent_model, "hyper_decoder", None), getattr(sampler, "module", None)):
        if module is not None:
            module.eval()
    enc = EncoderWrapper(encoder, family, encoder_input).eval()
    x = torch.as_tensor(images[:2])
    out = torch.as_tensor(contract.check_encoder(torch_run(enc), images[:8], family))
    flat = family != "vqvae" and out.shape[2:] == (1, 1) and _flat_latent(encoder, enc, x)
    dec = DecoderWrapper(decoder, flat).eval()
    modules: dict[str, nn.Module] = {"encoder": enc, "decoder": dec}
    coding = LatentCoding()
    if isinstance(latent_model, VQCodebook):
        if latent_model.num_codes < 1:
            raise InvalidInput(f"num_codes must be >= 1, got {latent_model.num_codes}")
        coding = LatentCoding(num_codes=latent_model.num_codes)
        if latent_model.prior is not None:
            modules["prior"] = latent_model.prior
    elif isinstance(latent_model, Hyperprior):
        if flat:
            raise InvalidInput("a hyperprior needs a spatial latent (N, C, h, w); the encoder "
                               "gives a flat (N, D) one")
        modules["hyper_encoder"] = latent_model.hyper_encoder
        modules["hyper_decoder"] = latent_model.hyper_decoder
        hyper_fit = (_density_fit(latent_model.density)
                     if latent_model.density is not None else None)
        coding = LatentCoding(step=1.0, hyper=True, hyper_fit=hyper_fit)
    else:
        step = latent_model.step or (DEFAULT_VAE_STEP if family == "vae" else 1.0)
        fit = None
        if latent_model.density is not None:
            if step != 1.0:
                raise InvalidInput(f"a learned density models the rounded latent: step must be "
                                   f"1, got {step}")
            fit = _density_fit(latent_model.density)
        coding = LatentCoding(step=step, fit=fit)
    feed = out.long() if family == "vqvae" else torch.round(out / coding.step) * coding.step
    contract.check_decoder(torch_run(dec), feed.numpy(), tuple(images.shape[1:]))
    if "prior" in modules:
        contract.check_prior(torch_run(modules["prior"]), feed.numpy(), coding.num_codes or 0)
    z_example = None
    if "hyper_encoder" in modules:
        z = contract.check_hyper_encoder(torch_run(modules["hyper_encoder"]), feed.numpy())
        z_example = torch.as_tensor(np.rint(z).astype(np.float32))
        contract.check_hyper_decoder(torch_run(modules["hyper_decoder"]), z_example.numpy(),
                                     tuple(feed.shape[1:]))
    latent_shape = tuple(int(s) for s in out.shape[1:])
    if sampler is not None:  # its contract on torch, before any export
        check_sampler(torch_run(SamplerWrapper(sampler.module, latent_shape).eval()),
                      sampler.noise_dim, latent_shape)
    dec_example = feed[:2]
    source = {"kind": "torch", "encoder": type(encoder).__name__,
              "decoder": type(decoder).__name__, "encoder_input": encoder_input,
              "latent_model": type(latent_model).__name__,
              "fully_convolutional": _fully_convolutional(enc, x, out)}
    for role in ("prior", "hyper_encoder", "hyper_decoder"):
        if role in modules:
            source[role] = type(modules[role]).__name__
    if sampler is not None:
        source["sampler"] = type(sampler.module).__name__

    def build(folder: Path) -> dict[str, str]:
        try:
            return _build(folder)
        except InvalidInput:
            raise
        except Exception as exc:  # noqa: BLE001 - the tracer raises anything
            raise InvalidInput(f"the model cannot be exported to ONNX: {exc}") from None

    def _build(folder: Path) -> dict[str, str]:
        files = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
        onnx_export(enc, x, folder / files["encoder"], input_name="image",
                    output_name="indices" if family == "vqvae" else "latent")
        onnx_export(dec, dec_example.float() if family != "vqvae" else dec_example,
                    folder / files["decoder"],
                    input_name="indices" if family == "vqvae" else "latent", output_name="image")
        if "prior" in modules:
            prior = modules["prior"]
            onnx_export(prior, dec_example, folder / "prior.onnx", input_name="indices",
                        output_name="logits")
            files["prior"] = "prior.onnx"
            from latentserve.export.nets.prior import PixelCNNPrior
            if isinstance(prior, PixelCNNPrior):
                from latentserve.export.nets.prior_step import export_prior_step
                export_prior_step(prior, dec_example, folder / "prior_step.onnx")
                files["prior_step"] = "prior_step.onnx"
        if z_example is not None:
            onnx_export(modules["hyper_encoder"], dec_example.float(),
                        folder / "hyper_encoder.onnx", input_name="latent",
                        output_name="hyper_latent")
            onnx_export(modules["hyper_decoder"], z_example[:2], folder / "hyper_decoder.onnx",
                        input_name="hyper_latent", output_name="scales")
            files.update(hyper_encoder="hyper_encoder.onnx", hyper_decoder="hyper_decoder.onnx")
        if sampler is not None:  # checked, exported and compared with torch
            export_sampler(sampler, latent_shape, folder / SAMPLER_FILE)
            files["sampler"] = SAMPLER_FILE
        return files

    return write_version(repo=repo, name=name, version=version, family=family, images=images,
                         build=build, coding=coding, source=source,
                         parity=_parity(family, modules, images), val_images=val_images,
                         opset=OPSET, producer=f"torch {torch.__version__}", seed=seed,
                         gmm_components=gmm_components, overwrite=overwrite,
                         sampling=None if sampler is None else learned_sampling(sampler))


def _flat_latent(encoder: nn.Module, wrapped: EncoderWrapper, x: Tensor) -> bool:
    """Whether the user's encoder itself gives (N, D) (the wrapper made it (N, D, 1, 1))."""
    with torch.no_grad():
        inp = x.float() / 255.0 if wrapped.encoder_input == "float" else x
        out = encoder(inp)
    if isinstance(out, (tuple, list)):
        out = out[0]
    z: Tensor = out
    return z.dim() == 2
