"""Fixtures for the PyTorch interop tests (data/torch_checkpoint.ts, models/torch_names.ts).

Two tiny SwAV models (ResNet-18 at width 2 and a width-reduced ResNet-50, imagenet stem) built from
resnet_reference.SwavResNet with random weights and BatchNorm statistics, saved as main_swav.py saves
them: torch.save({"epoch", "state_dict", "optimizer"}) with the `module.` prefix DistributedDataParallel
adds, in float32. Also the ResNet-18 one in the legacy (pre-1.6) format, and hostile files. The expected
outputs are torch's eval-mode forward in float64 on the float32 weights: pooled backbone features and
prototype scores on fixed inputs.

Run: /usr/bin/python3 reference/torch_checkpoint_reference.py  (writes test/fixtures/torch/)
"""

import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from resnet_reference import SwavResNet  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "test", "fixtures", "torch")
os.makedirs(OUT, exist_ok=True)

CASES = {
    "resnet18": dict(arch="resnet18", width=2, in_channels=3, stem="imagenet", hidden=16, out=8, prototypes=10),
    "resnet50": dict(arch="resnet50", width=2, in_channels=3, stem="imagenet", hidden=16, out=8, prototypes=10),
}


def make_model(config, seed):
    torch.manual_seed(seed)
    model = SwavResNet(**config)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return model.to(torch.float32).eval()


def save(obj, name, **kwargs):
    torch.save(obj, os.path.join(OUT, name), **kwargs)


expected = {}
for name, config in CASES.items():
    model = make_model(config, 7 if name == "resnet18" else 8)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    momentum = {i: {"momentum_buffer": torch.zeros(2, dtype=torch.float32)} for i in range(2)}
    checkpoint = {"epoch": 3, "state_dict": state, "optimizer": {"state": momentum, "param_groups": []}}
    save(checkpoint, f"{name}.pth")
    if name == "resnet18":
        save(checkpoint, f"{name}_legacy.pth", _use_new_zipfile_serialization=False)
    torch.manual_seed(99)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float32)
    model64 = model.to(torch.float64)
    with torch.no_grad():
        features = model64.forward_backbone(x.to(torch.float64))
        _, scores = model64.forward_head(features)
    expected[name] = {
        "config": {k: v for k, v in config.items() if k != "in_channels"} | {"inputChannels": 3},
        "input": [float("%.9g" % v) for v in x.permute(0, 2, 3, 1).reshape(-1).tolist()],  # NHWC, exact float32
        "inputShape": [2, 32, 32, 3],
        "features": [float("%.12g" % v) for v in features.reshape(-1).tolist()],
        "scores": [float("%.12g" % v) for v in scores.reshape(-1).tolist()],
    }

# A bare state_dict of the torchvision names with the `backbone.` prefix and no head (hub-style).
model = make_model(CASES["resnet18"], 7)
save({"model": {"backbone." + k: v for k, v in model.state_dict().items() if not k.startswith(("projection", "prototypes"))}},
     "resnet18_backbone.pt")


# Hostile files.
class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/swav_ts_pwned",))


buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {"conv1.weight": Evil()}}, protocol=2))
    z.writestr("archive/version", "3\n")
open(os.path.join(OUT, "hostile_os_system.pth"), "wb").write(buf.getvalue())

# A storage claiming 2^40 float32 elements: the tensor's shape says so, its data entry holds 16 bytes.
huge = torch.zeros(4, dtype=torch.float32)
buf = io.BytesIO()
torch.save({"conv1.weight": huge}, buf)
data = buf.getvalue()
zin = zipfile.ZipFile(io.BytesIO(data))
out = io.BytesIO()
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    for info in zin.infolist():
        content = zin.read(info.filename)
        if info.filename.endswith("data.pkl"):
            # The size tuple (4,) -> (2**40,): protocol-2 pickles store 4 as BININT1 K\x04 inside a TUPLE1.
            content = content.replace(b"K\x04\x85", b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"\x85", 1)
            content = content.replace(b"K\x04t", b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"t", 1)
        z.writestr(info.filename, content)
open(os.path.join(OUT, "hostile_huge.pth"), "wb").write(out.getvalue())

# Small valid files to damage.
small = {"state_dict": {"conv1.weight": torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)}}
buf = io.BytesIO()
torch.save(small, buf)
small_zip = buf.getvalue()
buf = io.BytesIO()
torch.save(small, buf, _use_new_zipfile_serialization=False)
small_legacy = buf.getvalue()

# A zip whose central directory points past its end.
data = bytearray(small_zip)
eocd = data.rfind(b"PK\x05\x06")
struct.pack_into("<I", data, eocd + 16, len(data) + 1000)
open(os.path.join(OUT, "hostile_outside.pth"), "wb").write(bytes(data))

# A truncated file (both formats).
open(os.path.join(OUT, "truncated.pth"), "wb").write(small_zip[: len(small_zip) // 2])
open(os.path.join(OUT, "truncated_legacy.pth"), "wb").write(small_legacy[: len(small_legacy) - 20])

# Weights that cannot be right (refused at load, naming the tensor): a NaN in a convolution, and a negative
# BatchNorm running variance. The ResNet-18 checkpoint otherwise.
def damaged(key, index, value, name):
    model = make_model(CASES["resnet18"], 7)
    state = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    state["module." + key].view(-1)[index] = value
    torch.save({"epoch": 3, "state_dict": state}, os.path.join(OUT, name))


damaged("layer1.0.conv1.weight", 5, float("nan"), "resnet18_nan.pth")
damaged("layer2.0.bn1.running_var", 1, -0.5, "resnet18_negative_var.pth")

json.dump(expected, open(os.path.join(OUT, "expected.json"), "w"))
print("wrote", sorted(os.listdir(OUT)))
