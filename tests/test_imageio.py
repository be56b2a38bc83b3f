"""Image files keep what they hold beyond pixels (TIFF layout and metadata, JPEG EXIF and CMYK, PNG chunks), or
are refused naming the file; a file that cannot be decoded is named in the error, whatever the decoder raised."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
from helpers import require_shared
from PIL import Image, ImageOps, JpegImagePlugin
from skimage.io import imread
from skimage.metrics import peak_signal_noise_ratio

from algnet_core.imageio import Stack, read_image, write_image

RNG = np.random.default_rng(0)
RGBA = (RNG.random((32, 40, 4)) * 255).astype(np.uint8)


def _round_trip(source: Path, target: Path) -> Stack:
    """Read ``source``, write its stack (same pages) to ``target``; the stack read."""
    stack = read_image(source)
    write_image(target, stack.with_pages(stack.pages.copy()))
    return stack


def test_cmyk_tiff_stays_cmyk_with_its_resolution(tmp_path) -> None:
    tifffile.imwrite(tmp_path / "in.tif", RGBA, photometric="separated", resolution=(300, 300), resolutionunit=2)
    stack = _round_trip(tmp_path / "in.tif", tmp_path / "out.tif")
    assert stack.pages.shape == (1, 32, 40, 4) and not stack.alpha  # K is a colour channel, not alpha
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        page = tif.pages[0]
        assert page.photometric == tifffile.PHOTOMETRIC.SEPARATED and page.extrasamples == ()
        assert page.resolution == (300.0, 300.0) and page.resolutionunit == tifffile.RESUNIT.INCH
        assert np.array_equal(tif.asarray(), RGBA)


def test_imagej_hyperstack_keeps_axes_resolution_and_metadata(tmp_path) -> None:
    data = (RNG.random((2, 3, 4, 20, 24)) * 4000).astype(np.uint16)
    metadata = {"axes": "TZCYX", "spacing": 2.5, "unit": "um", "finterval": 0.5, "Labels": [f"p{i}" for i in range(24)]}
    tifffile.imwrite(tmp_path / "in.tif", data, imagej=True, resolution=(10, 10), metadata=metadata)
    stack = _round_trip(tmp_path / "in.tif", tmp_path / "out.tif")
    assert stack.pages.shape == (24, 20, 24)
    with tifffile.TiffFile(tmp_path / "in.tif") as tif:
        expected = tif.imagej_metadata
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.series[0].axes == "TZCYX" and tif.pages[0].resolution == (10.0, 10.0)
        assert tif.imagej_metadata == expected and expected["spacing"] == 2.5 and expected["unit"] == "um"
        assert np.array_equal(tif.asarray(), data)


def test_ome_shaped_and_plain_tiffs_keep_their_axes_and_description(tmp_path) -> None:
    data = RNG.random((3, 20, 24)).astype(np.float32)
    tifffile.imwrite(tmp_path / "in.ome.tif", data, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.25})
    tifffile.imwrite(tmp_path / "shaped.tif", data, photometric="minisblack", metadata={"axes": "TYX", "note": "kept"})
    _round_trip(tmp_path / "in.ome.tif", tmp_path / "out.ome.tif")
    _round_trip(tmp_path / "shaped.tif", tmp_path / "out.tif")
    with tifffile.TiffFile(tmp_path / "out.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX" and 'PhysicalSizeX="0.25"' in tif.ome_metadata
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.series[0].axes == "TYX" and tif.shaped_metadata[0]["note"] == "kept"
    # a plain TIFF (not written by tifffile) keeps its own description and software tag
    tifffile.imwrite(tmp_path / "plain.tif", data, description="exposure 20 ms", software="scope", metadata=None)
    _round_trip(tmp_path / "plain.tif", tmp_path / "out_plain.tif")
    with tifffile.TiffFile(tmp_path / "out_plain.tif") as tif:
        page = tif.pages[0]
        assert (page.description, page.software, tif.series[0].shape) == ("exposure 20 ms", "scope", data.shape)


def test_planar_rgba_tiff_reads_channels_last_and_is_written_planar(tmp_path) -> None:
    tifffile.imwrite(tmp_path / "in.tif", np.moveaxis(RGBA, -1, 0), photometric="rgb", planarconfig="separate")
    stack = _round_trip(tmp_path / "in.tif", tmp_path / "out.tif")
    assert stack.pages.shape == (1, 32, 40, 4) and stack.alpha and np.array_equal(stack.pages[0], RGBA)
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.pages[0].planarconfig == tifffile.PLANARCONFIG.SEPARATE and tif.series[0].axes == "SYX"
        assert tif.pages[0].extrasamples == (tifffile.EXTRASAMPLE.UNASSALPHA,)


def test_compressed_tiff_is_written_compressed(tmp_path) -> None:
    smooth = np.tile(np.arange(40, dtype=np.uint16), (32, 1))
    tifffile.imwrite(tmp_path / "in.tif", smooth, compression="zlib")
    _round_trip(tmp_path / "in.tif", tmp_path / "out.tif")
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.pages[0].compression != tifffile.COMPRESSION.NONE and np.array_equal(tif.asarray(), smooth)


def test_tiffs_that_cannot_be_kept_are_refused_naming_the_file(tmp_path) -> None:
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:
        tif.write(RGBA[..., 0])
        tif.write(RGBA[:16, :20, 0])  # e.g. a thumbnail: a second series
    Image.fromarray(RGBA[..., :3]).convert("P").save(tmp_path / "palette.tif")
    with pytest.raises(ValueError, match=r"two\.tif holds 2 image series"):
        read_image(tmp_path / "two.tif")
    with pytest.raises(ValueError, match=r"palette\.tif: PALETTE TIFFs are not supported"):
        read_image(tmp_path / "palette.tif")


def test_jpeg_keeps_exif_orientation_icc_and_subsampling(tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif[0x010F] = "Camera maker"
    icc = b"\0\0\0\x10an ICC profile"
    Image.fromarray(RGBA[..., :3]).save(tmp_path / "in.jpg", exif=exif, icc_profile=icc, subsampling=0, quality=95)
    stack = _round_trip(tmp_path / "in.jpg", tmp_path / "out.jpg")
    assert stack.pages.shape == (1, 32, 40, 3)  # the stored orientation: deblurred as stored
    with Image.open(tmp_path / "in.jpg") as before, Image.open(tmp_path / "out.jpg") as after:
        assert after.info["exif"] == before.info["exif"] and after.getexif()[0x0112] == 6
        assert after.info["icc_profile"] == icc
        assert JpegImagePlugin.get_sampling(after) == 0  # 4:4:4 as the input, not Pillow's default 4:2:0
        assert ImageOps.exif_transpose(after).size == ImageOps.exif_transpose(before).size == (32, 40)


@pytest.mark.parametrize("quality", [50, 92])
def test_jpeg_is_written_at_the_quality_it_was_read(tmp_path, quality) -> None:
    photo = imread(require_shared() / "data/natural/kodak24/kodim01.png")[:96, :128]
    Image.fromarray(photo).save(tmp_path / "in.jpg", quality=quality)
    _round_trip(tmp_path / "in.jpg", tmp_path / "out.jpg")
    with Image.open(tmp_path / "in.jpg") as before, Image.open(tmp_path / "out.jpg") as after:
        assert after.quantization == before.quantization  # not quality 95's tables
        decoded = np.asarray(before)
        assert peak_signal_noise_ratio(decoded, np.asarray(after)) > 45  # the same tables re-encode nearly losslessly


def _png_with(path: Path, image: np.ndarray, extra: list[tuple[bytes, bytes]], **writer: object) -> None:
    """Write ``image`` with pypng (``writer`` arguments) and the chunks ``extra`` right after IHDR."""
    encoded = io.BytesIO()
    png.Writer(image.shape[1], image.shape[0], **writer).write(encoded, image.reshape(image.shape[0], -1))
    chunks = list(png.Reader(bytes=encoded.getvalue()).chunks())
    with open(path, "wb") as file:
        png.write_chunks(file, [chunks[0], *extra, *chunks[1:]])


def _chunks(path: Path, kinds: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    return [(kind, data) for kind, data in png.Reader(filename=str(path)).chunks() if kind in kinds]


def test_png_keeps_its_stored_values_and_ancillary_chunks(tmp_path) -> None:
    """12-bit camera data in a 16-bit PNG, as the PNG spec stores it (values << 4, sBIT 12): read as stored,
    not divided by 16 (pypng's direct decoding applies sBIT); pixel size, text and gamma come back too."""
    values = (RNG.integers(0, 4096, (20, 24)) << 4).astype(np.uint16)
    extra = [
        (b"gAMA", struct.pack(">I", 45455)),
        (b"sBIT", bytes([12])),
        (b"pHYs", struct.pack(">IIB", 11811, 11811, 1)),  # 300 dpi
        (b"tEXt", b"Comment\0objective 40x, exposure 20 ms"),
    ]
    _png_with(tmp_path / "in.png", values, extra, greyscale=True, bitdepth=16)
    stack = _round_trip(tmp_path / "in.png", tmp_path / "out.png")
    assert stack.pages.dtype == np.uint16 and np.array_equal(stack.pages[0], values)
    kinds = (b"gAMA", b"sBIT", b"pHYs", b"tEXt", b"tIME")
    assert _chunks(tmp_path / "out.png", kinds) == extra
    assert np.array_equal(read_image(tmp_path / "out.png").pages[0], values)
    with Image.open(tmp_path / "out.png") as out:
        assert out.info["Comment"] == "objective 40x, exposure 20 ms" and round(out.info["dpi"][0]) == 300

    # a palette PNG is written back as RGB: a palette's background index and significant bits do not apply
    palette = [(0, 0, 0), (255, 128, 0), (10, 200, 90)]
    indices = RNG.integers(0, 3, (20, 24)).astype(np.uint8)
    extra = [(b"sBIT", bytes([8, 8, 8])), (b"bKGD", bytes([1])), (b"pHYs", struct.pack(">IIB", 5000, 5000, 1))]
    _png_with(tmp_path / "palette.png", indices, extra, palette=palette, bitdepth=8)
    stack = _round_trip(tmp_path / "palette.png", tmp_path / "palette_out.png")
    assert np.array_equal(stack.pages[0], np.array(palette, np.uint8)[indices])
    assert _chunks(tmp_path / "palette_out.png", (b"sBIT", b"bKGD", b"pHYs", b"PLTE")) == extra[2:]


def test_cmyk_jpeg_stays_cmyk(tmp_path) -> None:
    Image.fromarray(RGBA[..., :3]).convert("CMYK").save(tmp_path / "in.jpg", quality=95)
    stack = _round_trip(tmp_path / "in.jpg", tmp_path / "out.jpg")
    assert stack.pages.shape == (1, 32, 40, 4) and not stack.alpha
    with Image.open(tmp_path / "out.jpg") as out:
        assert out.mode == "CMYK"
        assert np.abs(np.asarray(out, dtype=int) - stack.pages[0]).mean() < 2  # re-encoded, same inks
    with pytest.raises(ValueError, match=r"out\.png: a CMYK JPEG image can only be written as jpeg"):
        write_image(tmp_path / "out.png", stack)


def _broken_files(folder: Path) -> dict[str, bytes]:
    """Files that their decoders reject: truncated JPEG, PNG and TIFF, a 16-bit PNG with a bad CRC."""
    for name in ("a.jpg", "a.png", "a.tif"):
        write_image(folder / name, Stack(RGBA[None, ..., :3], (32, 40, 3)))
    write_image(folder / "a16.png", Stack(RGBA[None, ..., :3].astype(np.uint16) * 257, (32, 40, 3)))
    data = {name: (folder / name).read_bytes() for name in ("a.jpg", "a.png", "a.tif", "a16.png")}
    broken = {f"truncated{Path(n).suffix}": b[: len(b) // 2] for n, b in data.items() if n != "a16.png"}
    crc = bytearray(data["a16.png"])
    crc[-20] ^= 0xFF  # inside the last IDAT chunk: pypng's ChunkError
    return broken | {"bad_crc16.png": bytes(crc)}


def test_undecodable_files_are_named_in_the_error(tmp_path, monkeypatch) -> None:
    for name, data in _broken_files(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{tmp_path / name}: cannot read this"):
            read_image(tmp_path / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 32x40 pixels > twice that: a "decompression bomb"
    with pytest.raises(ValueError, match=r"a\.png: cannot read this PNG file: .*decompression bomb"):
        read_image(tmp_path / "a.png")


def test_unwritable_stacks_are_named_in_the_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"rgba\.jpg: .*not 4 channels"):
        write_image(tmp_path / "rgba.jpg", Stack(RGBA[None], RGBA.shape))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary
