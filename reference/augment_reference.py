"""Reference values for the image ops of data/augment.ts, from torchvision's tensor functional API.

Run with Debian's PyTorch:  /usr/bin/python3 reference/augment_reference.py
Writes test/fixtures/augment.json.

Every op runs on float64 tensors (torchvision's tensor path; PIL is only used by the reference SwAV
code for the same ops on uint8 images, and our pipeline is defined on float [0, 1] with torchvision's
tensor semantics). Inputs are fresh random images of several sizes; colour inputs are rounded to
float32 so that the TS side (float32 buffers) sees exactly the same values, equality tests in the
RGB -> HSV conversion included. Images are stored HWC row-major, like the TS buffers.
"""

import json
import math
import os

import torch
import torchvision.transforms.functional as F

torch.manual_seed(20240917)
torch.set_default_dtype(torch.float64)


def hwc(t):
    """CHW tensor -> flat HWC list."""
    return t.permute(1, 2, 0).reshape(-1).tolist()


def random_uint8(h, w):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8)


def random_float(h, w):
    """Uniform [0, 1] image whose values are exactly representable in float32."""
    return torch.rand(3, h, w).to(torch.float32).to(torch.float64)


def kernel_size_for(sigma):
    # Must match gaussianKernelSize in data/augment.ts: covers +-3 sigma.
    return 2 * math.ceil(3 * sigma) + 1


fixture = {"about": "torchvision " + __import__("torchvision").__version__ + ", torch " + torch.__version__}

# Crop + resize (antialiased bilinear, torchvision resized_crop(..., antialias=True)) + optional flip.
resize_cases = []
for (h, w, top, left, ch, cw, oh, ow, flip) in [
    (20, 30, 2, 3, 15, 24, 8, 8, False),     # downscale 3x2
    (20, 30, 0, 0, 20, 30, 7, 11, True),     # whole image, odd factors
    (17, 13, 4, 1, 9, 10, 24, 24, False),    # upscale
    (40, 50, 5, 7, 33, 37, 16, 16, True),    # downscale ~2.1x
    (40, 50, 10, 20, 5, 6, 16, 16, False),   # strong upscale
    (12, 12, 0, 0, 12, 12, 12, 12, False),   # identity
    (64, 48, 3, 2, 60, 45, 9, 13, True),     # strong downscale, mixed
    (25, 25, 2, 2, 20, 8, 10, 32, False),    # downscale one axis, upscale other
]:
    img_u8 = random_uint8(h, w)
    img = img_u8.to(torch.float64) / 255.0
    out = F.resized_crop(img, top, left, ch, cw, [oh, ow], antialias=True)
    if flip:
        out = F.hflip(out)
    resize_cases.append({
        "height": h, "width": w, "image": img_u8.permute(1, 2, 0).reshape(-1).tolist(),
        "top": top, "left": left, "cropHeight": ch, "cropWidth": cw,
        "outHeight": oh, "outWidth": ow, "flip": flip, "expected": hwc(out),
    })
fixture["resize"] = resize_cases

# Single colour ops with fixed factors.
colour_cases = []
for op, factors in [
    ("brightness", [0.2, 0.7, 1.0, 1.5, 1.8]),
    ("contrast", [0.2, 0.6, 1.0, 1.4, 1.8]),
    ("saturation", [0.0, 0.3, 1.0, 1.5, 1.8]),
    ("hue", [-0.5, -0.2, -0.05, 0.0, 0.1, 0.2, 0.5]),
]:
    for factor in factors:
        h, w = int(torch.randint(3, 12, ())), int(torch.randint(3, 12, ()))
        img = random_float(h, w)
        # A few grey and saturated pixels exercise the max == min and tie branches of rgb -> hsv.
        img[:, 0, 0] = img[0, 0, 0]
        img[1, 0, 1] = img[0, 0, 1]
        img[2, 1, 0] = 1.0
        fn = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
              "saturation": F.adjust_saturation, "hue": F.adjust_hue}[op]
        colour_cases.append({"op": op, "factor": factor, "height": h, "width": w,
                             "image": hwc(img), "expected": hwc(fn(img, factor))})
fixture["colour"] = colour_cases

# Colour jitter: the four ops in a given order with given factors (ColorJitter.forward after get_params).
jitter_cases = []
for _ in range(6):
    h, w = 9, 7
    img = random_float(h, w)
    order = torch.randperm(4).tolist()
    b = float(torch.empty(1).uniform_(0.2, 1.8))
    c = float(torch.empty(1).uniform_(0.2, 1.8))
    s = float(torch.empty(1).uniform_(0.2, 1.8))
    hue = float(torch.empty(1).uniform_(-0.2, 0.2))
    out = img
    for fn_id in order:
        if fn_id == 0:
            out = F.adjust_brightness(out, b)
        elif fn_id == 1:
            out = F.adjust_contrast(out, c)
        elif fn_id == 2:
            out = F.adjust_saturation(out, s)
        else:
            out = F.adjust_hue(out, hue)
    jitter_cases.append({"height": h, "width": w, "image": hwc(img), "order": order, "brightness": b,
                         "contrast": c, "saturation": s, "hue": hue, "expected": hwc(out)})
fixture["jitter"] = jitter_cases

# Grayscale (3 output channels, torchvision tensor weights 0.2989, 0.587, 0.114).
gray_cases = []
for h, w in [(5, 4), (8, 11)]:
    img = random_float(h, w)
    gray_cases.append({"height": h, "width": w, "image": hwc(img),
                       "expected": hwc(F.rgb_to_grayscale(img, num_output_channels=3))})
fixture["grayscale"] = gray_cases

# Gaussian blur: a true Gaussian, reflect padding, kernel 2*ceil(3 sigma)+1.
blur_cases = []
for h, w, sigma in [(16, 16, 2.0), (16, 16, 0.1), (20, 13, 1.3), (32, 32, 0.7), (9, 24, 1.0), (14, 14, 1.99)]:
    img = random_float(h, w)
    k = kernel_size_for(sigma)
    out = F.gaussian_blur(img, [k, k], [sigma, sigma])
    blur_cases.append({"height": h, "width": w, "sigma": sigma, "kernelSize": k,
                       "image": hwc(img), "expected": hwc(out)})
fixture["blur"] = blur_cases

# Normalise.
mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
img = random_float(6, 5)
fixture["normalize"] = [{"height": 6, "width": 5, "mean": mean, "std": std, "image": hwc(img),
                         "expected": hwc(F.normalize(img, mean, std))}]

# Whole crop pipeline with explicit parameters, in the SwAV order:
# crop+resize -> flip -> jitter (order, factors) -> grayscale -> blur -> normalise.
pipeline_cases = []
for i in range(5):
    h, w = 30, 40
    img_u8 = random_uint8(h, w)
    size = [12, 16, 20, 12, 16][i]
    top, left, ch, cw = [(2, 3, 20, 25), (0, 0, 30, 40), (5, 9, 10, 12), (1, 1, 28, 30), (10, 5, 15, 20)][i]
    flip = i % 2 == 0
    jitter = i != 3
    gray = i in (1, 4)
    sigma = [0.5, None, 1.7, 0.1, 1.2][i]
    order = torch.randperm(4).tolist()
    factors = {"brightness": float(torch.empty(1).uniform_(0.2, 1.8)),
               "contrast": float(torch.empty(1).uniform_(0.2, 1.8)),
               "saturation": float(torch.empty(1).uniform_(0.2, 1.8)),
               "hue": float(torch.empty(1).uniform_(-0.2, 0.2))}
    x = F.resized_crop(img_u8.to(torch.float64) / 255.0, top, left, ch, cw, [size, size], antialias=True)
    if flip:
        x = F.hflip(x)
    if jitter:
        for fn_id in order:
            x = [lambda t: F.adjust_brightness(t, factors["brightness"]),
                 lambda t: F.adjust_contrast(t, factors["contrast"]),
                 lambda t: F.adjust_saturation(t, factors["saturation"]),
                 lambda t: F.adjust_hue(t, factors["hue"])][fn_id](x)
    if gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if sigma is not None:
        k = kernel_size_for(sigma)
        x = F.gaussian_blur(x, [k, k], [sigma, sigma])
    rgb = F.normalize(x, mean, std)
    # channels = 1: ITU-R 601-2 luma of the final RGB, normalised with mean[0], std[0].
    luma = (x[0] * 299 / 1000 + x[1] * 587 / 1000 + x[2] * 114 / 1000 - mean[0]) / std[0]
    pipeline_cases.append({
        "height": h, "width": w, "image": img_u8.permute(1, 2, 0).reshape(-1).tolist(), "size": size,
        "box": {"top": top, "left": left, "height": ch, "width": cw}, "flip": flip,
        "jitter": {"order": order, **factors} if jitter else None, "grayscale": gray, "blurSigma": sigma,
        "mean": mean, "std": std, "expected": hwc(rgb), "expectedGrey": luma.reshape(-1).tolist(),
    })
fixture["pipeline"] = pipeline_cases

# Eval transform: Resize(shorter side = resize) + CenterCrop(size), antialiased bilinear.
eval_cases = []
for h, w, resize, size in [(30, 40, 16, 16), (40, 30, 20, 16), (16, 16, 16, 16), (10, 14, 24, 20)]:
    img_u8 = random_uint8(h, w)
    x = F.resize(img_u8.to(torch.float64) / 255.0, [resize], antialias=True)
    x = F.center_crop(x, [size, size])
    eval_cases.append({"height": h, "width": w, "image": img_u8.permute(1, 2, 0).reshape(-1).tolist(),
                       "resize": resize, "size": size, "mean": mean, "std": std,
                       "expected": hwc(F.normalize(x, mean, std))})
fixture["eval"] = eval_cases

out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "augment.json")
os.makedirs(os.path.dirname(out_path), exist_ok=True)
with open(out_path, "w") as f:
    json.dump(fixture, f, separators=(",", ":"))
print("wrote", os.path.normpath(out_path), os.path.getsize(out_path), "bytes")
