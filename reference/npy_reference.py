"""Writes small .npy files with NumPy itself (and their values as JSON) for test/npy_test.ts.

Run: /usr/bin/python3 reference/npy_reference.py
"""
import json
import os

import numpy as np

out = os.path.join(os.path.dirname(__file__), "..", "test", "fixtures", "npy")
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(20200617)
arrays = {
    "features_f4": rng.standard_normal((5, 3)).astype("<f4"),
    "labels_i8": rng.integers(-1, 10, size=7).astype("<i8"),
    "labels_i4": rng.integers(0, 1000, size=4).astype("<i4"),
    "cube_f8": rng.standard_normal((2, 3, 2)).astype("<f8"),
    "bytes_u1": rng.integers(0, 256, size=(3, 2)).astype("u1"),
    "empty_f4": np.zeros((0, 4), dtype="<f4"),
}
expected = {}
for name, array in arrays.items():
    np.save(os.path.join(out, f"{name}.npy"), array)
    expected[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "values": array.ravel().tolist()}
# Format 2.0 (uint32 header length), as NumPy writes for very wide structured headers.
with open(os.path.join(out, "features_v2.npy"), "wb") as f:
    np.lib.format.write_array(f, arrays["features_f4"], version=(2, 0))
expected["features_v2"] = expected["features_f4"]
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
