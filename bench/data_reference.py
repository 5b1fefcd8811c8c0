"""PIL reference for bench/data_bench.ts: writes ~500x375 JPEGs and times decoding them.

/usr/bin/python3 bench/data_reference.py <folder> <count>
Writes <count> JPEGs (quality 90, 4:2:0, natural-looking content) to <folder> if
they are not there, then decodes each one to RGB pixels with PIL (one thread, best of three passes) and
prints a JSON line {"decoder": "PIL ...", "images": n, "seconds": s, "imagesPerSecond": r}.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

folder = Path(sys.argv[1])
count = int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
paths = []
for i in range(count):
    path = folder / f"img_{i:04d}.jpg"
    if not path.exists():
        y, x = np.mgrid[0:375, 0:500].astype(np.float64)
        base = np.stack([128 + 100 * np.sin(x / (20 + i % 7)) * np.cos(y / 31), 255 * x / 500, 255 * y / 375], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
    paths.append(path)

# Warm-up, then the timed pass: read the file and decode to an RGB array, as the TS bench does.
for path in paths[:5]:
    np.asarray(Image.open(path).convert("RGB"))
# Best of three passes: the machine may be shared, the minimum is the least disturbed.
seconds = float("inf")
for _ in range(3):
    start = time.perf_counter()
    for path in paths:
        np.asarray(Image.open(path).convert("RGB"))
    seconds = min(seconds, time.perf_counter() - start)
print(json.dumps({"decoder": f"PIL {Image.__version__}", "images": count, "seconds": seconds,
                  "imagesPerSecond": count / seconds}))
