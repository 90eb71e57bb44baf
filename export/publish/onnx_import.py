"""Import ONNX graphs made elsewhere (another framework, another team) as a repository version.

``import_onnx`` fits each graph to the family's I/O contract by wrapping it, never by
editing its inside: a new graph input ``image`` (uint8) feeds the old one through
Cast / Div 255 where the old one took floats; the chosen output reaches ``latent`` /
``indices`` / ``image`` / ``logits`` through Cast, Unsqueeze (a flat (N, D) latent is
served as (N, D, 1, 1)) or a clamp to [0, 1]. What cannot fit is refused naming the
file, the tensor and what the contract needs (several inputs, a fixed batch axis, a
vqvae encoder without its codebook lookup, ...). Then ``export.writer`` checks the
running graphs, fits the tables on the sample images, measures rate and PSNR and writes
the version. No torch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.export.publish.writer import DEFAULT_VAE_STEP, LatentCoding, write_version

Family = Literal["ae", "vae", "vqvae"]
FLOATS = {1: "float", 10: "float16", 11: "double", 16: "bfloat16"}  # onnx TensorProto ids
INTS = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 12: "uint32",
        13: "uint64"}
UINT8, FLOAT, INT64 = 2, 1, 7


def _type_name(elem: int) -> str:
    return FLOATS.get(elem) or INTS.get(elem) or f"type {elem}"


@dataclass(frozen=True)
class _Tensor:
    name: str
    elem: int
    dims: tuple[int | str | None, ...] | None  # None: rank unknown; str: symbolic


def _describe(info: Any) -> _Tensor:
    t = info.type.tensor_type
    dims = None
    if t.HasField("shape"):
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in t.shape.dim)
    return _Tensor(info.name, t.elem_type, dims)


def _load(path: Path, role: str) -> Any:
    import onnx

    if not Path(path).is_file():
        raise InvalidInput(f"{role} file {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx raises its own and protobuf errors
        raise InvalidInput(f"{role} file {path} is not a valid ONNX model: {exc}") from None
    return model


def _opset(model: Any) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def _only_input(model: Any, role: str, path: Path) -> _Tensor:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise InvalidInput(f"{path}: the {role} has {len(inputs)} inputs ({names}); the "
                           f"contract's {role} takes exactly one tensor")
    t = _describe(inputs[0])
    if t.dims is not None and t.dims and isinstance(t.dims[0], int) and t.dims[0] > 0:
        raise InvalidInput(f"{path}: {role} input {t.name!r} has a fixed batch size "
                           f"{t.dims[0]}; latentserve batches images, so axis 0 must be "
                           "dynamic (export it with a dynamic batch axis)")
    return t


def _pick_output(model: Any, role: str, path: Path, name: str | None) -> _Tensor:
    outputs = [_describe(o) for o in model.graph.output]
    if name is not None:
        for o in outputs:
            if o.name == name:
                return o
        raise InvalidInput(f"{path}: the {role} has no output {name!r}; its outputs are "
                           + ", ".join(repr(o.name) for o in outputs))
    if not outputs:
        raise InvalidInput(f"{path}: the {role} has no outputs")
    return outputs[0]


class _Rewriter:
    """Adds nodes in front of and behind one graph; names never collide with its own."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = _opset(model)
        self.pre: list[Any] = []
        self.post: list[Any] = []
        self.count = 0

    def fresh(self, what: str) -> str:
        self.count += 1
        return f"latentserve_{what}_{self.count}"

    def rename(self, old: str, new: str) -> None:
        for node in self.graph.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]

    def const(self, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh("const")
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def node(self, where: list[Any], op: str, inputs: list[str], output: str | None = None,
             **attrs: Any) -> str:
        from onnx import helper

        out = output or self.fresh(op.lower())
        where.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def unsqueeze(self, where: list[Any], x: str, axes: list[int],
                  output: str | None = None) -> str:
        if self.opset >= 13:
            return self.node(where, "Unsqueeze", [x, self.const(np.array(axes, np.int64))], output)
        return self.node(where, "Unsqueeze", [x], output, axes=axes)

    def replace_input(self, old: _Tensor, new_name: str, elem: int,
                      dims: list[int | str | None]) -> str:
        """A new graph input ``new_name``; returns the name the old input's value must get."""
        from onnx import helper

        inits = {i.name for i in self.graph.initializer}
        keep = [i for i in self.graph.input if i.name != old.name or i.name in inits]
        target = old.name
        if old.name == new_name:
            target = self.fresh("input")
            self.rename(old.name, target)
        del self.graph.input[:]
        self.graph.input.extend([helper.make_tensor_value_info(new_name, elem, dims), *keep])
        return target

    def replace_outputs(self, new_name: str, elem: int, rank: int) -> None:
        from onnx import helper

        del self.graph.output[:]
        self.graph.output.append(
            helper.make_tensor_value_info(new_name, elem, ["N", *[None] * (rank - 1)]))

    def finish(self) -> Any:
        import onnx

        nodes = [*self.pre, *self.graph.node, *self.post]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        onnx.checker.check_model(self.model)
        return self.model


def _cast(rw: _Rewriter, where: list[Any], x: str, to: int, output: str | None = None) -> str:
    return rw.node(where, "Cast", [x], output, to=to)


def _output_name_free(rw: _Rewriter, out: _Tensor, new_name: str) -> str:
    """The chosen output's value under a name that is not ``new_name`` (renamed if it was)."""
    if out.name != new_name:
        return out.name
    inner = rw.fresh("output")
    rw.rename(out.name, inner)
    return inner


def adapt_encoder(model: Any, path: Path, family: Family, image_shape: tuple[int, int, int], *,
                  output: str | None = None, input_range: float = 1.0) -> tuple[Any, bool]:
    """Wrap an encoder to ``image`` uint8 -> ``latent`` / ``indices``; returns (model, flat)."""
    inp = _only_input(model, "encoder", path)
    out = _pick_output(model, "encoder", path, output)
    if inp.dims is not None:
        if len(inp.dims) != 4:
            raise InvalidInput(f"{path}: encoder input {inp.name!r} has rank {len(inp.dims)} "
                               f"{inp.dims}; the contract's image is (N, C, H, W)")
        for axis, (have, want) in enumerate(zip(inp.dims[1:], image_shape, strict=True), start=1):
            if isinstance(have, int) and have > 0 and have != want:
                raise InvalidInput(f"{path}: encoder input {inp.name!r} has {have} at axis "
                                   f"{axis}, the sample images {want} (C, H, W = {image_shape})")
    if inp.elem not in FLOATS and inp.elem not in INTS:
        raise InvalidInput(f"{path}: encoder input {inp.name!r} is {_type_name(inp.elem)}; "
                           "an image input is uint8 or float")
    want_out = "indices" if family == "vqvae" else "latent"
    if family == "vqvae" and out.elem not in INTS:
        raise InvalidInput(f"{path}: encoder output {out.name!r} is {_type_name(out.elem)}; a "
                           "vqvae encoder must give integer codebook indices (N, h, w) (put "
                           "the nearest-code lookup inside the graph)")
    if family != "vqvae" and out.elem not in FLOATS:
        raise InvalidInput(f"{path}: encoder output {out.name!r} is {_type_name(out.elem)}; an "
                           f"{family} encoder must give a float latent (N, C, h, w) or (N, D)")
    rank = len(out.dims) if out.dims is not None else None
    if family == "vqvae" and rank not in (None, 3):
        raise InvalidInput(f"{path}: encoder output {out.name!r} has rank {rank}; vqvae "
                           "indices are (N, h, w)")
    if family != "vqvae" and rank not in (None, 2, 4):
        raise InvalidInput(f"{path}: encoder output {out.name!r} has rank {rank}; the latent "
                           "is (N, C, h, w) or (N, D)")
    rw = _Rewriter(model)
    old = rw.replace_input(inp, "image", UINT8, ["N", *image_shape])
    x = "image"
    if inp.elem in FLOATS:
        x = _cast(rw, rw.pre, x, FLOAT)
        if input_range != 255.0:
            x = rw.node(rw.pre, "Div", [x, rw.const(np.array(255.0 / input_range, np.float32))])
        if inp.elem != FLOAT:
            x = _cast(rw, rw.pre, x, inp.elem)
    elif inp.elem != UINT8:
        x = _cast(rw, rw.pre, x, inp.elem)
    rw.node(rw.pre, "Identity", [x], old)
    y = _output_name_free(rw, out, want_out)
    flat = rank == 2
    if family == "vqvae":
        _cast(rw, rw.post, y, INT64, want_out)
        rw.replace_outputs(want_out, INT64, 3)
    else:
        if out.elem != FLOAT:
            y = _cast(rw, rw.post, y, FLOAT)
        if flat:
            rw.unsqueeze(rw.post, y, [2, 3], want_out)
        else:
            rw.node(rw.post, "Identity", [y], want_out)
        rw.replace_outputs(want_out, FLOAT, 4)
    return rw.finish(), flat


def adapt_decoder(model: Any, path: Path, family: Family, *, flat: bool,
                  output: str | None = None, output_range: float = 1.0) -> Any:
    """Wrap a decoder to ``latent`` / ``indices`` -> ``image`` float in [0, 1]."""
    inp = _only_input(model, "decoder", path)
    out = _pick_output(model, "decoder", path, output)
    name = "indices" if family == "vqvae" else "latent"
    if family == "vqvae" and inp.elem not in INTS:
        raise InvalidInput(f"{path}: decoder input {inp.name!r} is {_type_name(inp.elem)}; a "
                           "vqvae decoder takes integer indices (N, h, w)")
    if family != "vqvae" and inp.elem not in FLOATS:
        raise InvalidInput(f"{path}: decoder input {inp.name!r} is {_type_name(inp.elem)}; an "
                           f"{family} decoder takes a float latent")
    if out.elem not in FLOATS and out.elem not in INTS:
        raise InvalidInput(f"{path}: decoder output {out.name!r} is {_type_name(out.elem)}; "
                           "the contract's image is float in [0, 1] (or uint8 pixels)")
    rank = len(inp.dims) if inp.dims is not None else None
    if family != "vqvae" and rank is not None and (rank == 2) != flat:
        raise InvalidInput(f"{path}: decoder input {inp.name!r} has rank {rank}, but the "
                           f"encoder's latent is {'(N, D)' if flat else '(N, C, h, w)'}")
    rw = _Rewriter(model)
    elem = INT64 if family == "vqvae" else FLOAT
    old = rw.replace_input(inp, name, elem, ["N"] + ([None] * 2 if family == "vqvae" else
                                                     [None] * 3))
    x = name
    if flat:
        x = rw.node(rw.pre, "Flatten", [x], axis=1)
    if inp.elem != elem:
        x = _cast(rw, rw.pre, x, inp.elem)
    rw.node(rw.pre, "Identity", [x], old)
    y = _output_name_free(rw, out, "image")
    if out.elem != FLOAT:
        y = _cast(rw, rw.post, y, FLOAT)
    if out.elem == UINT8 or output_range != 1.0:
        scale = 255.0 if out.elem == UINT8 and output_range == 1.0 else output_range
        y = rw.node(rw.post, "Div", [y, rw.const(np.array(scale, np.float32))])
    y = rw.node(rw.post, "Min", [y, rw.const(np.array(1.0, np.float32))])
    rw.node(rw.post, "Max", [y, rw.const(np.array(0.0, np.float32))], "image")
    rw.replace_outputs("image", FLOAT, 4)
    return rw.finish()


def adapt_prior(model: Any, path: Path, *, output: str | None = None) -> Any:
    """Wrap a prior to ``indices`` int64 -> ``logits`` float."""
    inp = _only_input(model, "prior", path)
    out = _pick_output(model, "prior", path, output)
    if inp.elem not in INTS:
        raise InvalidInput(f"{path}: prior input {inp.name!r} is {_type_name(inp.elem)}; the "
                           "prior takes integer indices (N, h, w)")
    if out.elem not in FLOATS:
        raise InvalidInput(f"{path}: prior output {out.name!r} is {_type_name(out.elem)}; the "
                           "prior gives float logits (N, K, h, w)")
    rw = _Rewriter(model)
    old = rw.replace_input(inp, "indices", INT64, ["N", None, None])
    x = _cast(rw, rw.pre, "indices", inp.elem) if inp.elem != INT64 else "indices"
    rw.node(rw.pre, "Identity", [x], old)
    y = _output_name_free(rw, out, "logits")
    _cast(rw, rw.post, y, FLOAT, "logits")
    rw.replace_outputs("logits", FLOAT, 4)
    return rw.finish()


def graph_image_shape(path: Path) -> tuple[int, int, int] | None:
    """(C, H, W) when the encoder's input fixes all three, else None."""
    model = _load(path, "encoder")
    inp = _only_input(model, "encoder", path)
    if inp.dims is None or len(inp.dims) != 4:
        return None
    dims = inp.dims[1:]
    if all(isinstance(d, int) and d > 0 for d in dims):
        return (int(dims[0]), int(dims[1]), int(dims[2]))  # type: ignore[arg-type]
    return None


def import_onnx(*, family: Family, encoder: str | Path, decoder: str | Path,
                images: np.ndarray, repo: str | Path, name: str, version: int,
                prior: str | Path | None = None, step: float | None = None,
                num_codes: int | None = None, encoder_output: str | None = None,
                input_range: float = 1.0, output_range: float = 1.0,
                overwrite: bool = False) -> Path:
    """Fit the graphs to the contract, fit the tables on ``images``, write the version.

    ``images``: uint8 (N, C, H, W) samples. ``input_range`` / ``output_range``: 1 when the
    float graphs take / give pixels in [0, 1], 255 for [0, 255]. ``num_codes`` (vqvae):
    the codebook size; default the prior's K (required without a prior).
    """
    import onnx

    if family not in ("ae", "vae", "vqvae"):
        raise InvalidInput(f"family {family!r} is not one of ae, vae, vqvae")
    if family != "vqvae" and prior is not None:
        raise InvalidInput(f"a prior graph is for a vqvae; an {family} is coded under "
                           "factorised tables fitted on the sample images")
    for what, r in (("input_range", input_range), ("output_range", output_range)):
        if r not in (1.0, 255.0):
            raise InvalidInput(f"{what} must be 1 or 255, got {r}")
    encoder, decoder = Path(encoder), Path(decoder)
    image_shape = tuple(int(s) for s in images.shape[1:])
    enc_model, flat = adapt_encoder(_load(encoder, "encoder"), encoder, family, image_shape,  # type: ignore[arg-type]
                                    output=encoder_output, input_range=input_range)
    dec_model = adapt_decoder(_load(decoder, "decoder"), decoder, family, flat=flat,
                              output_range=output_range)
    prior_model = adapt_prior(_load(Path(prior), "prior"), Path(prior)) if prior else None
    if family == "vqvae" and num_codes is None:
        num_codes = _infer_codes(enc_model, prior_model, images)
    coding = LatentCoding(step=step or (DEFAULT_VAE_STEP if family == "vae" else 1.0),
                          num_codes=num_codes)

    def build(folder: Path) -> dict[str, str]:
        files = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
        onnx.save(enc_model, str(folder / "encoder.onnx"))
        onnx.save(dec_model, str(folder / "decoder.onnx"))
        if prior_model is not None:
            onnx.save(prior_model, str(folder / "prior.onnx"))
            files["prior"] = "prior.onnx"
        return files

    producers = sorted({m.producer_name or "unknown" for m in (enc_model, dec_model)})
    source = {"kind": "onnx-import", "encoder": encoder.name, "decoder": decoder.name,
              "prior": Path(prior).name if prior else None, "producer": ", ".join(producers),
              "flat_latent": flat, "input_range": input_range, "output_range": output_range}
    return write_version(repo=repo, name=name, version=version, family=family, images=images,
                         build=build, coding=coding, source=source,
                         opset=_opset(enc_model), producer=f"imported ({', '.join(producers)})",
                         overwrite=overwrite)


def _infer_codes(enc_model: Any, prior_model: Any, images: np.ndarray) -> int:
    import onnxruntime as ort

    enc = ort.InferenceSession(enc_model.SerializeToString(), providers=["CPUExecutionProvider"])
    try:
        idx = enc.run(None, {"image": images[:2]})[0].astype(np.int64)
    except Exception as exc:  # noqa: BLE001 - the contract check names it properly later
        raise InvalidInput(
            f"encoder fails on the sample images {images[:2].shape}: {exc}") from None
    if prior_model is None:
        raise InvalidInput("a vqvae without a prior needs its codebook size (--num-codes): "
                           "sample images cannot show the codes they do not use")
    sess = ort.InferenceSession(prior_model.SerializeToString(), providers=["CPUExecutionProvider"])
    try:
        logits = sess.run(None, {"indices": idx})[0]
    except Exception as exc:  # noqa: BLE001
        raise InvalidInput(f"prior fails on the encoder's indices {idx.shape}: {exc}") from None
    if logits.ndim != 4:
        raise InvalidInput(f"prior output 'logits' is {tuple(logits.shape)}; expected "
                           "(N, K, h, w)")
    return int(logits.shape[1])
