"""Loads swav-ts exports with PyTorch / ONNX tools, for test/torch_export_test.ts.

  interop_check.py safetensors FILE CONFIG_JSON INPUT_JSON
      Loads FILE (the README's header parse; Debian has no python3-safetensors) strictly into
      torchvision's ResNet (CONFIG "torchvision:resnet18", fc = Identity) or, for a width-reduced
      model with head, into resnet_reference.SwavResNet; runs eval-mode float64 on INPUT
      ({"input": NHWC values, "inputShape": [N, H, W, C]}); prints {"features", "scores"?} as JSON.
  interop_check.py onnx FILE
      onnx.checker.check_model(full_check=True); prints the opset and the graph's outputs.
"""

import json
import struct
import sys

import torch


def load_safetensors(path):
    # The README's load.
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    return {
        k: torch.frombuffer(bytearray(raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]), dtype=torch.float32).reshape(v["shape"])
        for k, v in header.items()
        if k != "__metadata__"
    }


def main():
    if sys.argv[1] == "onnx":
        import onnx

        model = onnx.load(sys.argv[2])
        onnx.checker.check_model(model, full_check=True)
        print(json.dumps({"ok": True, "opset": model.opset_import[0].version, "outputs": [o.name for o in model.graph.output]}))
        return
    state = load_safetensors(sys.argv[2])
    config = json.loads(sys.argv[3])
    data = json.load(open(sys.argv[4]))
    x = torch.tensor(data["input"], dtype=torch.float64).reshape(data["inputShape"]).permute(0, 3, 1, 2)
    if isinstance(config, str) and config.startswith("torchvision:"):
        import torchvision

        model = getattr(torchvision.models, config.split(":")[1])()
        model.fc = torch.nn.Identity()
        model.load_state_dict(state)
        model = model.to(torch.float64).eval()
        with torch.no_grad():
            print(json.dumps({"features": model(x).reshape(-1).tolist()}))
        return
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from resnet_reference import SwavResNet

    model = SwavResNet(**config)
    model.load_state_dict(state)
    model = model.to(torch.float64).eval()
    with torch.no_grad():
        features = model.forward_backbone(x)
        _, scores = model.forward_head(features)
    print(json.dumps({"features": features.reshape(-1).tolist(), "scores": scores.reshape(-1).tolist()}))


main()
