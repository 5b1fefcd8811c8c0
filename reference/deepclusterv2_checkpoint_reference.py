"""An official-layout DeepCluster-v2 checkpoint (main_deepclusterv2.py) for models/torch_names.ts.

main_deepclusterv2.py builds resnet_models.__dict__[arch](normalize=True, hidden_mlp, output_dim,
nmb_prototypes=[K_0, K_1, K_2]); its prototypes are a MultiPrototypes module holding one
nn.Linear(output_dim, K_h, bias=False) per head as attribute `prototypes{h}`, so the state dict has
`prototypes.prototypes{h}.weight` of shape [K_h, D]; the training script saves
{"epoch", "state_dict", "optimizer"} with DistributedDataParallel's `module.` prefix. Here a tiny such
model (ResNet-18 at width 2, imagenet stem, head 16 -> 8, heads of 10, 12 and 14 prototypes) with random
weights and BatchNorm statistics, and torch's eval-mode float64 forward on the float32 weights: pooled
backbone features, normalised embeddings and each head's scores on a fixed input.

Run: /usr/bin/python3 reference/deepclusterv2_checkpoint_reference.py OUT_DIR
     (writes OUT_DIR/deepclusterv2.pth, deepclusterv2_gap.pth and deepclusterv2.json)
"""

import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from resnet_reference import SwavResNet  # noqa: E402

out_dir = sys.argv[1]
HEADS = [10, 12, 14]


class MultiPrototypes(nn.Module):
    """src/resnet50.py's MultiPrototypes, as the official code defines it."""

    def __init__(self, output_dim, nmb_prototypes):
        super().__init__()
        self.nmb_heads = len(nmb_prototypes)
        for i, k in enumerate(nmb_prototypes):
            self.add_module("prototypes" + str(i), nn.Linear(output_dim, k, bias=False))

    def forward(self, x):
        return [getattr(self, "prototypes" + str(i))(x) for i in range(self.nmb_heads)]


torch.manual_seed(31)
model = SwavResNet(arch="resnet18", width=2, in_channels=3, stem="imagenet", hidden=16, out=8, prototypes=1)
model.prototypes = MultiPrototypes(8, HEADS)
for m in model.modules():
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        nn.init.uniform_(m.weight, 0.5, 1.5)
        nn.init.normal_(m.bias, 0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.num_batches_tracked.fill_(5)
model = model.to(torch.float32).eval()
state = {"module." + k: v for k, v in model.state_dict().items()}
torch.save({"epoch": 2, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}},
           os.path.join(out_dir, "deepclusterv2.pth"))
# The same with head 1 missing: refused in one line, never loaded with a random head in its place.
gap = {k: v for k, v in state.items() if k != "module.prototypes.prototypes1.weight"}
torch.save({"epoch": 2, "state_dict": gap}, os.path.join(out_dir, "deepclusterv2_gap.pth"))

x = torch.randn(2, 3, 32, 32, dtype=torch.float32)
model64 = model.to(torch.float64)
with torch.no_grad():
    features = model64.forward_backbone(x.to(torch.float64))
    z = nn.functional.normalize(model64.projection_head(features), dim=1, p=2)
    scores = model64.prototypes(z)
json.dump({
    "heads": HEADS,
    "input": [float("%.9g" % v) for v in x.permute(0, 2, 3, 1).reshape(-1).tolist()],  # NHWC, exact float32
    "inputShape": [2, 32, 32, 3],
    "features": features.reshape(-1).tolist(),
    "embeddings": z.reshape(-1).tolist(),
    "scores": [s.reshape(-1).tolist() for s in scores],
}, open(os.path.join(out_dir, "deepclusterv2.json"), "w"))
