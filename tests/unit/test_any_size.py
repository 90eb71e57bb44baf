"""Any-size models: format-2 codes (the size field), padding and cropping, tiles,
size-grouped batches, the channel rule and the sample refusal (tests/fixtures_models.py
``photo_repo``: untrained tiny photo codecs, so only exact things are compared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentserve.errors import (
    CodeError,
    CorruptCode,
    InvalidInput,
    ResourceLimit,
    UnsupportedOperation,
)
from latentserve.worker.codec.codes import (
    MAX_SIDE,
    SIZED_VERSION,
    pack,
    parse_header,
    read_size_field,
    size_field,
)
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.images import convert_channels, decode_image, encode_png
from latentserve.worker.runtime.pipeline import Pipeline

SIZES = [(1, 1), (17, 33), (321, 481), (16, 16), (33, 17)]


def photos(channels: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (channels, h, w), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def pipeline(photo_repo: Path) -> Pipeline:
    return Pipeline(photo_repo, EngineConfig(intra_op_threads=1))


@pytest.mark.parametrize("h, w, nbytes", [(1, 1, 2), (128, 128, 2), (129, 128, 3),
                                          (321, 481, 4), (16384, 16384, 4),
                                          (MAX_SIDE, MAX_SIDE, 6)])
def test_size_field_is_short_and_reads_back(h: int, w: int, nbytes: int) -> None:
    field = size_field(h, w)
    assert len(field) == nbytes
    assert read_size_field(b"x" + field + b"rest", 1) == ((h, w), 1 + nbytes)


@pytest.mark.parametrize("field, match", [
    (b"", "ends inside its size field \\(height\\)"),
    (b"\x10", "ends inside its size field \\(width\\)"),
    (b"\x90", "ends inside its size field \\(height\\)"),
    (b"\x80\x80\x80\x01\x00", "longer than 3 bytes"),
    (b"\x80\x00\x00", "not in its shortest form"),
    (b"\xff\xff\x7f\x00", "over 65536"),
])
def test_bad_size_fields_are_refused(field: bytes, match: str) -> None:
    with pytest.raises(CorruptCode, match=match):
        read_size_field(field, 0)


def test_sizes_outside_the_format_cannot_be_written() -> None:
    for h, w in [(0, 5), (5, 0), (MAX_SIDE + 1, 1)]:
        with pytest.raises(InvalidInput):
            size_field(h, w)


def test_odd_sizes_round_trip_grouped_by_size(pipeline: Pipeline) -> None:
    images = photos(3, SIZES + [(17, 33)])
    codes = pipeline.compress("tiny-photo", images)
    heads = [parse_header(c) for c in codes]
    assert [h.version for h in heads] == [SIZED_VERSION] * len(codes)
    assert [h.size for h in heads] == SIZES + [(17, 33)]
    # Batch invariance: alone or batched with other sizes, the same bytes.
    assert codes == [pipeline.compress("tiny-photo", [im])[0] for im in images]
    out = pipeline.reconstruct_each(codes)
    assert [o.shape for o in out] == [im.shape for im in images]  # type: ignore[union-attr]
    # Decoding is deterministic: the same image from a code, alone or batched.
    alone = pipeline.reconstruct_each(codes[1:2])[0]
    assert np.array_equal(alone, out[1])  # type: ignore[arg-type]


def test_an_array_batch_and_a_list_give_the_same_codes(pipeline: Pipeline) -> None:
    batch = np.stack(photos(3, [(40, 24)] * 3))
    assert pipeline.compress("tiny-photo", batch) == pipeline.compress("tiny-photo", list(batch))


def test_grey_model_round_trip(pipeline: Pipeline) -> None:
    images = photos(1, [(1, 1), (17, 33)])
    out = pipeline.reconstruct_each(pipeline.compress("tiny-photo-grey", images))
    assert [o.shape for o in out] == [(1, 1, 1), (1, 17, 33)]  # type: ignore[union-attr]


def test_wrong_channel_count_is_refused_naming_both(pipeline: Pipeline) -> None:
    with pytest.raises(InvalidInput, match=r"\(N, 3, H, W\)"):
        pipeline.compress("tiny-photo", photos(1, [(8, 8)]))
    png = encode_png(photos(1, [(17, 33)])[0])
    with pytest.raises(InvalidInput, match="is L 33x17; the model takes RGB, any size"):
        decode_image(png, (3, 0, 0))
    converted = decode_image(png, (3, 0, 0), resize=True)  # resize converts the mode only
    assert converted.shape == (3, 17, 33)
    assert np.array_equal(converted, convert_channels(photos(1, [(17, 33)])[0], 3))


def test_convert_channels_matches_pillow() -> None:
    from PIL import Image

    rgb = photos(3, [(9, 7)])[0]
    want = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L"))[None]
    assert np.array_equal(convert_channels(rgb, 1), want)


def test_tiles_match_the_whole_image(photo_repo: Path, pipeline: Pipeline) -> None:
    """Tiles with context: codes and pixels as the untiled run's, up to float rounding
    (compared with a tolerance, never for bit equality)."""
    tiled = Pipeline(photo_repo, EngineConfig(intra_op_threads=1, untiled_pixels=64 * 64,
                                              tile_cells=3, tile_margin=4))
    image = photos(3, [(150, 130)], seed=3)
    whole = pipeline.runtime("tiny-photo").encode(np.stack(image))
    parts = tiled.runtime("tiny-photo").encode(np.stack(image))
    assert whole.shape == parts.shape == (1, 8, 10, 9)
    assert (whole == parts).mean() > 0.99
    a = pipeline.runtime("tiny-photo").decode(whole, (150, 130)).astype(np.int64)
    b = tiled.runtime("tiny-photo").decode(whole, (150, 130)).astype(np.int64)
    assert np.abs(a - b).max() <= 1


def test_codes_over_the_pixel_limit_are_refused(photo_repo: Path, pipeline: Pipeline) -> None:
    codes = pipeline.compress("tiny-photo", photos(3, [(17, 33), (2, 2)]))
    small = Pipeline(photo_repo, max_pixels=100)
    out = small.reconstruct_each(codes)
    assert isinstance(out[0], ResourceLimit) and "33x17 = 561 pixel" in str(out[0])
    assert out[1].shape == (3, 2, 2)  # type: ignore[union-attr]
    with pytest.raises(ResourceLimit, match="the limit is 100"):
        small.reconstruct(codes[:1])


def test_a_corrupted_size_is_refused(pipeline: Pipeline) -> None:
    code = pipeline.compress("tiny-photo", photos(3, [(17, 33)]))[0]
    assert code[7:9] == size_field(17, 33)
    for bad in (code[:7] + bytes([code[7] ^ 1]) + code[8:],   # another height
                code[:8] + b"\x80" + code[9:],                  # a cut-off width varint
                code[:8]):                                      # truncated in the field
        (result,) = pipeline.reconstruct_each([bad])
        assert isinstance(result, CorruptCode), bad
    # A code of this model but without the size (format 1) is refused too.
    digest = pipeline.codec("tiny-photo").manifest.digest
    v1 = pack(digest, 1, parse_header(code).payload)
    (result,) = pipeline.reconstruct_each([v1])
    assert isinstance(result, CodeError) and "format" in str(result)


def test_sample_is_refused_naming_what_the_model_can_do(pipeline: Pipeline) -> None:
    with pytest.raises(UnsupportedOperation, match="supports compress, reconstruct") as info:
        pipeline.sample("tiny-photo", 1, seed=0)
    assert info.value.metadata["supported"] == "compress,reconstruct"
    m = pipeline.codec("tiny-photo").manifest
    assert m.operations == ("compress", "reconstruct") and m.any_size and m.stride == 16
