"""Reference timing: SwAV's multi-crop transform (facebookresearch/swav src/multicropdataset.py)
with torchvision + PIL, one thread. Called by bench/multicrop_bench.ts; prints one JSON line.

    /usr/bin/python3 bench/multicrop_reference.py --width 500 --height 375 --images 60 \
        --nmb 2 6 --size 224 96 --min-scale 0.14 0.05 --max-scale 1 0.14 [--no-blur]
"""

import argparse
import json
import random
import time

import numpy as np
import torch
import torchvision.transforms as transforms
from PIL import Image, ImageFilter

torch.set_num_threads(1)


class PILRandomGaussianBlur(object):
    """As in the SwAV reference: PIL's GaussianBlur with radius uniform in (0.1, 2.0), p 0.5."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        do_it = np.random.rand() <= self.prob
        if not do_it:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def get_color_distortion(s=1.0):
    color_jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    rnd_color_jitter = transforms.RandomApply([color_jitter], p=0.8)
    rnd_gray = transforms.RandomGrayscale(p=0.2)
    return transforms.Compose([rnd_color_jitter, rnd_gray])


def build(nmb, size, min_scale, max_scale, blur):
    color_transform = [get_color_distortion()] + ([PILRandomGaussianBlur()] if blur else [])
    mean, std = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
    trans = []
    for i in range(len(size)):
        crop = transforms.RandomResizedCrop(size[i], scale=(min_scale[i], max_scale[i]))
        trans.extend([transforms.Compose([
            crop,
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.Compose(color_transform),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ])] * nmb[i])
    return trans


def synthetic_images(width, height, count, seed=0):
    """Smooth random images (noise upscaled), so resize and blur see natural-ish content."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((width, height), Image.BILINEAR))
    return images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--nmb", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--size", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--min-scale", type=float, nargs="+", default=[0.14, 0.05])
    parser.add_argument("--max-scale", type=float, nargs="+", default=[1.0, 0.14])
    parser.add_argument("--no-blur", action="store_true")
    args = parser.parse_args()
    trans = build(args.nmb, args.size, args.min_scale, args.max_scale, not args.no_blur)
    images = synthetic_images(args.width, args.height, 16)
    for image in images[:4]:  # warm-up
        [t(image) for t in trans]
    start = time.perf_counter()
    for n in range(args.images):
        crops = [t(images[n % len(images)]) for t in trans]
    elapsed = time.perf_counter() - start
    assert len(crops) == sum(args.nmb)
    print(json.dumps({"imagesPerSecond": args.images / elapsed, "images": args.images, "seconds": elapsed}))


if __name__ == "__main__":
    main()
