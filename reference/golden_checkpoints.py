#!/usr/bin/python3
"""Golden checkpoint files of format version 1, written byte by byte without the project's writer.

Run from the repository root with any Python 3 (standard library only):

    python3 reference/golden_checkpoints.py

Writes test/fixtures/checkpoints/v1-checksum.swav (header with the sha256 payload checksum, as every
build writes since it was added) and v1-no-checksum.swav (the same content as written before it: no
checksum field). Both hold model arrays (float32 and one int32 scalar), optimiser slots and a queue.
test/checkpoint_golden_test.ts reads them and recomputes every value from `value` below, so a change to
the on-disk format (a renamed dtype, a moved offset, a different header) fails there, whether or not
the writer and the reader change together.
"""

import hashlib
import json
import os
import struct

# (name, shape, dtype): model arrays, optimiser slots ("optimiser/<name>"), queue ("queue/<crop>").
TENSORS = [
    ("backbone.conv1.weight", [2, 3, 3, 1], "float32"),
    ("backbone.bn1.num_batches_tracked", [], "int32"),
    ("projection.0.bias", [3], "float32"),
    ("prototypes.weight", [5, 3], "float32"),
    ("optimiser/backbone.conv1.weight", [2, 3, 3, 1], "float32"),
    ("optimiser/prototypes.weight", [5, 3], "float32"),
    ("queue/0", [4, 3], "float32"),
    ("queue/1", [4, 3], "float32"),
]


def value(t, i, dtype):
    """Element i of tensor t: eighths in [-11/8, 11/8] (exact in float32), or an int32 around -1000."""
    if dtype == "int32":
        return (i * 7 + t * 13) % 23 - 1000
    return ((i * 7 + t * 13) % 23 - 11) / 8


def count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def build(with_checksum):
    payload = b""
    entries = []
    for t, (name, shape, dtype) in enumerate(TENSORS):
        n = count(shape)
        values = [value(t, i, dtype) for i in range(n)]
        entries.append({"name": name, "shape": shape, "dtype": dtype, "offset": len(payload), "length": n})
        payload += struct.pack("<%d%s" % (n, "i" if dtype == "int32" else "f"), *values)
    header = {
        "version": 1,
        "step": 12,
        "epoch": 3,
        "batchInEpoch": 2,
        "config": {"train": {"seed": 7, "batchSize": 4}, "swav": {"cropsForAssign": [0, 1]}},
        "extra": {
            "seed": 7,
            "backend": "wasm",
            "queue": {"length": 4, "batchSize": 2, "dim": 3, "cropsForAssign": [0, 1], "filled": 4},
        },
        "tensors": entries,
    }
    if with_checksum:
        header["checksum"] = {"algorithm": "sha256", "payload": hashlib.sha256(payload).hexdigest()}
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = (len(text) + 3) // 4 * 4
    return b"SWAVCKPT" + struct.pack("<II", 1, padded) + text + b" " * (padded - len(text)) + payload


folder = "test/fixtures/checkpoints"
os.makedirs(folder, exist_ok=True)
for name, with_checksum in [("v1-checksum.swav", True), ("v1-no-checksum.swav", False)]:
    with open(os.path.join(folder, name), "wb") as f:
        f.write(build(with_checksum))
    print("wrote", os.path.join(folder, name))
