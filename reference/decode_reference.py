"""Fixture images and their PIL-decoded pixels for test/decode_test.ts.

Run with Debian's Python: /usr/bin/python3 reference/decode_reference.py

Writes tiny PNG and JPEG files to test/fixtures/images/ together with the
pixels PIL decodes from them (HWC RGB uint8, `<name>.rgb`) and a manifest
(`expected.json`) with sizes, the tolerance each case is held to, and a few
stats. Sizes are odd on purpose: partial JPEG MCUs, chroma upsampling at the
edges, PNG rows whose byte length is not a multiple of the pixel size.

Expected values:
- 8-bit PNG, JPEG: PIL's `Image.open(path).convert("RGB")` (alpha dropped, as PIL does).
- 16-bit PNG: PIL 9 clips I;16 to 8 bits instead of scaling and keeps only the
  high byte of 16-bit RGB, so the expectation is computed from the written
  16-bit samples as round(v / 257), the rule swav-ts documents.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "test" / "fixtures" / "images"
W, H = 33, 21
rng = np.random.default_rng(20240611)


def smooth_rgb(w=W, h=H):
    """A natural-looking image: gradients plus mild noise (JPEG-friendly)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    g = 40 + 180 * x / w
    b = 220 - 180 * y / h
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def png_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_png(path, samples, bit_depth, color_type, interlace=False):
    """A minimal PNG writer (PIL cannot write 16-bit RGB or Adam7); filters vary per row."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    bpp = max(1, channels * bit_depth // 8)

    def encode_rows(img):
        out = bytearray()
        prev = None
        for row_index, row in enumerate(img):
            raw = np.ascontiguousarray(row.astype(dtype)).tobytes()
            kind = row_index % 5  # all five filter types: None, Sub, Up, Average, Paeth
            out.append(kind)
            out += filter_row(kind, raw, prev if prev is not None else bytes(len(raw)), bpp)
            prev = raw
        return out

    if interlace:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        data = bytearray()
        for x0, y0, dx, dy in passes:
            sub = samples[y0::dy, x0::dx]
            if sub.shape[0] and sub.shape[1]:
                data += encode_rows(sub)
    else:
        data = encode_rows(samples)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 1 if interlace else 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(data), 9))
        + png_chunk(b"IEND", b"")
    )


def filter_row(kind, raw, prev, bpp):
    out = bytearray(len(raw))
    for i in range(len(raw)):
        a = raw[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 0:
            p = 0
        elif kind == 1:
            p = a
        elif kind == 2:
            p = b
        elif kind == 3:
            p = (a + b) // 2
        else:
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        out[i] = (raw[i] - p) & 0xFF
    return bytes(out)


def pil_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []

    def record(name, file, pixels, tolerance, note):
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        (OUT / f"{name}.rgb").write_bytes(pixels.tobytes())
        cases.append({
            "name": name,
            "file": file,
            "width": int(pixels.shape[1]),
            "height": int(pixels.shape[0]),
            "meanAbsTolerance": tolerance,
            "mean": float(pixels.mean()),
            "note": note,
        })

    rgb = smooth_rgb()
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)

    # PNG via PIL (its encoder picks the filters).
    for name, img, note in [
        ("png_grey8", Image.fromarray(grey, "L"), "8-bit greyscale"),
        ("png_grey1", Image.fromarray(grey > 128).convert("1"), "1-bit greyscale"),
        ("png_grey_alpha", Image.fromarray(np.stack([grey, alpha], -1), "LA"), "greyscale + alpha"),
        ("png_rgb8", Image.fromarray(rgb, "RGB"), "8-bit truecolour"),
        ("png_rgba8", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "truecolour + alpha"),
    ]:
        img.save(OUT / f"{name}.png")
        record(name, f"{name}.png", pil_rgb(OUT / f"{name}.png"), 0, note)

    # Palette: 8-bit indices, 4-bit indices (16 colours), and a palette with tRNS transparency.
    pal8 = Image.fromarray(rgb).quantize(colors=200)
    pal8.save(OUT / "png_palette8.png")
    record("png_palette8", "png_palette8.png", pil_rgb(OUT / "png_palette8.png"), 0, "palette, 8-bit indices")
    pal4 = Image.fromarray(rgb).quantize(colors=16)
    pal4.save(OUT / "png_palette4.png", bits=4)
    record("png_palette4", "png_palette4.png", pil_rgb(OUT / "png_palette4.png"), 0, "palette, 4-bit indices")
    pal_t = Image.fromarray(rgb).quantize(colors=64)
    pal_t.info["transparency"] = bytes([i * 4 for i in range(64)])
    pal_t.save(OUT / "png_palette_trns.png", transparency=bytes([i * 4 for i in range(64)]))
    record("png_palette_trns", "png_palette_trns.png", pil_rgb(OUT / "png_palette_trns.png"), 0,
           "palette with tRNS alpha")

    # Our writer: every filter type, 16-bit, Adam7.
    rgb16 = (rgb.astype(np.uint32) * 257 + rng.integers(-128, 128, rgb.shape)).clip(0, 65535).astype(np.uint16)
    grey16 = (grey.astype(np.uint32) * 257 + rng.integers(-128, 128, grey.shape)).clip(0, 65535).astype(np.uint16)
    alpha16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    scale = lambda v: np.rint(v.astype(np.float64) / 257.0).astype(np.uint8)  # noqa: E731

    write_png(OUT / "png_grey16.png", grey16, 16, 0)
    record("png_grey16", "png_grey16.png", np.repeat(scale(grey16)[..., None], 3, -1), 0,
           "16-bit greyscale, expected round(v/257)")
    write_png(OUT / "png_rgb16.png", rgb16, 16, 2)
    record("png_rgb16", "png_rgb16.png", scale(rgb16), 0, "16-bit truecolour, expected round(v/257)")
    write_png(OUT / "png_rgba16.png", np.dstack([rgb16, alpha16]), 16, 6)
    record("png_rgba16", "png_rgba16.png", scale(rgb16), 0, "16-bit truecolour + alpha, expected round(v/257)")
    write_png(OUT / "png_rgb8_filters.png", rgb, 8, 2)
    record("png_rgb8_filters", "png_rgb8_filters.png", pil_rgb(OUT / "png_rgb8_filters.png"), 0,
           "all five row filters")
    write_png(OUT / "png_rgb8_adam7.png", rgb, 8, 2, interlace=True)
    record("png_rgb8_adam7", "png_rgb8_adam7.png", pil_rgb(OUT / "png_rgb8_adam7.png"), 0, "Adam7 interlaced")

    # JPEG: baseline 4:2:0, baseline 4:4:4, progressive, greyscale. Tolerance: mean |diff| < 3.
    Image.fromarray(rgb).save(OUT / "jpeg_baseline.jpg", quality=90)
    record("jpeg_baseline", "jpeg_baseline.jpg", pil_rgb(OUT / "jpeg_baseline.jpg"), 3, "baseline, 4:2:0")
    Image.fromarray(rgb).save(OUT / "jpeg_baseline444.jpg", quality=90, subsampling=0)
    record("jpeg_baseline444", "jpeg_baseline444.jpg", pil_rgb(OUT / "jpeg_baseline444.jpg"), 3, "baseline, 4:4:4")
    Image.fromarray(rgb).save(OUT / "jpeg_progressive.jpg", quality=85, progressive=True)
    record("jpeg_progressive", "jpeg_progressive.jpg", pil_rgb(OUT / "jpeg_progressive.jpg"), 3,
           "progressive, 4:2:0")
    Image.fromarray(grey, "L").save(OUT / "jpeg_grey.jpg", quality=90)
    record("jpeg_grey", "jpeg_grey.jpg", pil_rgb(OUT / "jpeg_grey.jpg"), 3, "greyscale JPEG")

    (OUT / "expected.json").write_text(json.dumps({"generator": "reference/decode_reference.py", "cases": cases},
                                                  indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
