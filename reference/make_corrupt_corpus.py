#!/usr/bin/python3
"""Writes the corrupt-input corpus test/fixtures/corrupt/ and its manifest.json.

Run with Debian's python3 (PIL from python3-pil):

    /usr/bin/python3 reference/make_corrupt_corpus.py [OUT_FOLDER]

Every file is tiny (at most 32x32) and the output is deterministic (fixed seeds,
fixed PIL encoder settings), so the committed corpus can be regenerated and
diffed. Bad files must be skipped and named by the loader; good files are
unusual but valid and must decode. The good files are checked here with PIL,
the reference decoder (a good file PIL cannot read would be a bug in this
script). Special files (a directory and a FIFO with image names, a symlink
loop) cannot be committed reliably: the test and the probe make them at run
time (listed in the manifest under "runtime").
"""
import io
import json
import os
import random
import struct
import sys
import zlib

from PIL import Image

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "corrupt")
rng = random.Random(18)


def pattern(w, h, mode="RGB", seed=0):
    """A smooth, seeded colour pattern (compresses small, decodes to something non-trivial)."""
    r = random.Random(seed)
    a, b, c = r.randint(1, 9), r.randint(1, 9), r.randint(0, 255)
    img = Image.new("RGB", (w, h))
    img.putdata([((x * a * 8 + c) % 256, (y * b * 8) % 256, ((x + y) * 16 + c) % 256)
                 for y in range(h) for x in range(w)])
    return img.convert(mode) if mode != "RGB" else img


def chunk(kind, data, crc=None):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", (zlib.crc32(body) if crc is None else crc)
                                                               & 0xFFFFFFFF)


def png(width, height, depth, colour, rows, palette=None, interlace=0, idat=None):
    """A PNG from raw rows (filter 0 prepended here); `idat` overrides the compressed body."""
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    out = sig + chunk(b"IHDR", ihdr)
    if palette is not None:
        out += chunk(b"PLTE", bytes(v for rgb in palette for v in rgb))
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + row for row in rows), 9)
    return out + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def samples_to_rows(width, height, depth, channels, values):
    """Packs row-major samples (ints) into PNG rows of `depth` bits (MSB first below 8)."""
    rows = []
    per_row = width * channels
    for y in range(height):
        vals = values[y * per_row:(y + 1) * per_row]
        if depth == 16:
            rows.append(b"".join(struct.pack(">H", v) for v in vals))
        elif depth == 8:
            rows.append(bytes(vals))
        else:
            bits = "".join(format(v, "0%db" % depth) for v in vals)
            bits += "0" * (-len(bits) % 8)
            rows.append(bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)))
    return rows


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def adam7_idat(width, height, depth, channels, values):
    """The zlib body of an Adam7-interlaced image: each pass's sub-image, rows filtered with type 0."""
    raw = b""
    for x0, y0, dx, dy in ADAM7:
        xs = list(range(x0, width, dx))
        ys = list(range(y0, height, dy))
        if not xs or not ys:
            continue
        sub = [values[(y * width + x) * channels + c] for y in ys for x in xs for c in range(channels)]
        raw += b"".join(b"\x00" + r for r in samples_to_rows(len(xs), len(ys), depth, channels, sub))
    return zlib.compress(raw, 9)


def jpeg(img, **options):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=options.pop("quality", 85), **options)
    return buf.getvalue()


def png_pil(img):
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def patch_sof(data, height, width):
    """Rewrites the frame header's height and width (first SOF0/SOF2 marker)."""
    data = bytearray(data)
    i = 2
    while i < len(data):
        assert data[i] == 0xFF
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF marker")


def offset_of_sos(data):
    i = 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xDA:
            return i
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    raise ValueError("no SOS marker")


files = []  # (name, bytes, good, why)


def good(name, data, why):
    files.append((name, data, True, why))


def bad(name, data, why):
    files.append((name, data, False, why))


# --- good but unusual: must decode -------------------------------------------------------------------
base_png = png_pil(pattern(24, 24, seed=1))
base_jpg = jpeg(pattern(24, 24, seed=2))
good("cmyk.jpg", jpeg(pattern(24, 24, "CMYK", seed=3)), "CMYK JPEG (Adobe APP14, inverted)")
good("progressive.jpg", jpeg(pattern(24, 24, seed=4), progressive=True), "progressive JPEG")
good("grey.jpg", jpeg(pattern(16, 16, "L", seed=5)), "greyscale JPEG")
good("subsampled420.jpg", jpeg(pattern(17, 13, seed=6), subsampling=2), "4:2:0 JPEG, odd size")
w = h = 16
good("grey16.png", png(w, h, 16, 0, samples_to_rows(w, h, 16, 1, [(x * 4099 + y * 97) % 65536 for y in range(h) for x in range(w)])),
     "16-bit greyscale PNG")
rgb16 = [(x * 4099 + y * 331 + c * 20000) % 65536 for y in range(h) for x in range(w) for c in range(3)]
good("rgb16.png", png(w, h, 16, 2, samples_to_rows(w, h, 16, 3, rgb16)), "16-bit RGB PNG")
good("grey_alpha.png", png(w, h, 8, 4, samples_to_rows(w, h, 8, 2, [v for y in range(h) for x in range(w) for v in ((x * 16) % 256, (y * 16) % 256)])),
     "greyscale + alpha PNG (colour type 4)")
rgba = [v for y in range(h) for x in range(w) for v in ((x * 16) % 256, (y * 16) % 256, 128, 200)]
good("rgba.png", png(w, h, 8, 6, samples_to_rows(w, h, 8, 4, rgba)), "RGBA PNG")
w, h = 21, 19
rgb = [(x * 12 + c * 80 + y * 5) % 256 for y in range(h) for x in range(w) for c in range(3)]
good("interlaced.png", png(w, h, 8, 2, None, interlace=1, idat=adam7_idat(w, h, 8, 3, rgb)),
     "Adam7-interlaced RGB PNG, odd size")
pal = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(16)]
w = h = 16
good("palette.png", png(w, h, 8, 3, samples_to_rows(w, h, 8, 1, [(x + y) % 16 for y in range(h) for x in range(w)]), palette=pal),
     "palette PNG, 8-bit indices")
good("palette4.png", png(w, h, 4, 3, samples_to_rows(w, h, 4, 1, [(x * y) % 16 for y in range(h) for x in range(w)]), palette=pal),
     "palette PNG, 4-bit indices")
w, h = 13, 11
good("bit1.png", png(w, h, 1, 0, samples_to_rows(w, h, 1, 1, [(x ^ y) & 1 for y in range(h) for x in range(w)])),
     "1-bit greyscale PNG, width not a multiple of 8")
good("jpeg_named.png", base_jpg, "a JPEG with a .png name: the format comes from the bytes")
good("upper.JPG", jpeg(pattern(16, 16, seed=7)), "upper-case extension")

# --- bad: must be skipped and named ---------------------------------------------------------------
bad("empty.png", b"", "zero-byte file")
bad("empty.jpg", b"", "zero-byte file")
bad("text.png", b"hello, not an image\n", "no image signature")
for cut in (8, 20, 33, len(base_png) // 2, len(base_png) - 13):
    bad("trunc%04d.png" % cut, base_png[:cut], "PNG truncated at byte %d of %d" % (cut, len(base_png)))
sos = offset_of_sos(base_jpg)
for cut in (3, 20, sos, (sos + len(base_jpg)) // 2):
    bad("trunc%04d.jpg" % cut, base_jpg[:cut], "JPEG truncated at byte %d of %d" % (cut, len(base_jpg)))
bad("random_png.png", base_png[:8] + bytes(rng.randrange(256) for _ in range(300)),
    "PNG signature, then random bytes")
bad("random_jpg.jpg", b"\xff\xd8\xff" + bytes(rng.randrange(256) for _ in range(300)),
    "JPEG magic, then random bytes")
bad("header17_random.jpg", base_jpg[:20] + bytes(rng.randrange(256) for _ in range(300)),
    "JPEG magic + 17 header bytes (the whole JFIF APP0 segment) + random bytes")
# A CRC error in IDAT (the data itself intact).
ihdr_end = 8 + 25
idat_len = struct.unpack(">I", base_png[ihdr_end:ihdr_end + 4])[0]
crc_at = ihdr_end + 8 + idat_len
bad_crc = base_png[:crc_at] + bytes(b ^ 0xFF for b in base_png[crc_at:crc_at + 4]) + base_png[crc_at + 4:]
bad("bad_crc.png", bad_crc, "IDAT chunk with a wrong CRC")
bad("zero_width.png", png(0, 16, 8, 0, [], idat=zlib.compress(b"", 9)), "IHDR width 0")
bad("zero_height.png", png(16, 0, 8, 0, [], idat=zlib.compress(b"", 9)), "IHDR height 0")
# A decompression bomb declared in the header: 20000x20000 RGB (1.2 GB raw) with a small body (the
# first 64 KiB of zero rows); must be rejected from IHDR, before any inflation.
bad("bomb_20000.png", png(20000, 20000, 8, 2, None, idat=zlib.compress(bytes(65536), 9)),
    "IHDR declares 20000x20000 (1.2 GB of RGB) with a tiny body: reject from the header")
bad("huge.jpg", patch_sof(base_jpg, 60000, 60000), "SOF declares 60000x60000: reject from the header")
bad("zero_dim.jpg", patch_sof(base_jpg, 0, 24), "SOF height 0 (DNL, unsupported)")

# --- write --------------------------------------------------------------------------------------------
os.makedirs(OUT, exist_ok=True)
for entry in os.listdir(OUT):
    os.remove(os.path.join(OUT, entry))
manifest = {
    "about": "Corrupt-input corpus for issue 18, written by reference/make_corrupt_corpus.py. "
             "good: must decode; bad: must be skipped (onError skip) and named, in a deterministic order.",
    "files": [],
    "runtime": [
        {"name": "dir.png", "kind": "directory", "good": False,
         "why": "an empty directory with an image name: skipped and named, never a crash"},
        {"name": "fifo.png", "kind": "fifo", "good": False,
         "why": "a FIFO with an image name: skipped and named, never read (a read would block forever)"},
        {"name": "loop.jpg", "kind": "symlink-loop", "good": False,
         "why": "a symlink to itself: skipped and named (ELOOP), never a crash"},
    ],
}
for name, data, is_good, why in files:
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
    if is_good:
        img = Image.open(io.BytesIO(data))
        img.load()
        img.convert("RGB")
    entry = {"name": name, "good": is_good, "bytes": len(data), "why": why}
    if is_good:
        entry["size"] = list(Image.open(io.BytesIO(data)).size)
    manifest["files"].append(entry)
with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
total = sum(len(d) for _, d, _, _ in files)
print("%d files (%d good, %d bad), %d bytes, in %s" % (
    len(files), sum(1 for f in files if f[2]), sum(1 for f in files if not f[2]), total, OUT))
