"""Reference for bench/pipeline_bench.ts: files -> PIL decode -> SwAV multi-crop (torchvision) through a
torch DataLoader with worker processes, as facebookresearch/swav trains (src/multicropdataset.py).

    /usr/bin/python3 bench/pipeline_reference.py generate <jpeg-folder> <jpegs> <png-folder> <pngs>
    /usr/bin/python3 bench/pipeline_reference.py time --folder F --workers W --batch B --passes P \
        --nmb 2 6 --size 224 96 --min-scale 0.14 0.05 --max-scale 1 0.14 [--no-blur]

`generate` writes the benchmark images where they are missing: 500x375 JPEGs (quality 90, 4:2:0) with
gradients, shapes and noise, and 32x32 PNGs cut from smaller such scenes. `time` runs one warm-up pass
(worker start, caches) and then `passes` timed passes over the folder with persistent workers, each worker
limited to one torch thread; it prints one JSON line with every pass's images per second.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as transforms
from PIL import Image, ImageDraw, ImageFilter

# The reference's colour distortion and blur, shared with the multi-crop reference.
from multicrop_reference import PILRandomGaussianBlur, get_color_distortion  # noqa: E402

torch.set_num_threads(1)


def scene(rng, width, height):
    """Natural-ish content: two smooth gradients, a few filled shapes, a soft blur and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    period = rng.uniform(0.3, 1.5, 3) * max(width, height)
    base = np.stack([128 + 100 * np.sin(2 * np.pi * (x * np.cos(p) + y * np.sin(p)) / t + p)
                     for p, t in zip(phase, period)], -1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 10)):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1 + 2, y1 + 2], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 400))
    pixels = np.asarray(image).astype(np.float64) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(jpeg_folder, jpegs, png_folder, pngs):
    rng = np.random.default_rng(0)
    jpeg_folder.mkdir(parents=True, exist_ok=True)
    png_folder.mkdir(parents=True, exist_ok=True)
    for i in range(jpegs):
        path = jpeg_folder / f"img_{i:05d}.jpg"
        if not path.exists():
            scene(rng, 500, 375).save(path, quality=90, subsampling="4:2:0")
    for i in range(pngs):
        path = png_folder / f"img_{i:05d}.png"
        if not path.exists():
            # Downscaled from 128 px, as CIFAR images are downscaled photographs.
            scene(rng, 128, 128).resize((32, 32), Image.BOX).save(path)


class MultiCropDataset(torch.utils.data.Dataset):
    """src/multicropdataset.py of the SwAV reference, over a flat folder of images (no labels)."""

    def __init__(self, folder, nmb, size, min_scale, max_scale, blur):
        self.paths = sorted(str(p) for p in Path(folder).iterdir() if p.suffix in (".jpg", ".png"))
        color_transform = [get_color_distortion()] + ([PILRandomGaussianBlur()] if blur else [])
        mean, std = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
        self.trans = []
        for i in range(len(size)):
            crop = transforms.RandomResizedCrop(size[i], scale=(min_scale[i], max_scale[i]))
            self.trans.extend([transforms.Compose([
                crop,
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.Compose(color_transform),
                transforms.ToTensor(),
                transforms.Normalize(mean=mean, std=std),
            ])] * nmb[i])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return [t(image) for t in self.trans]


def worker_init(_):
    torch.set_num_threads(1)


def time_loader(args):
    dataset = MultiCropDataset(args.folder, args.nmb, args.size, args.min_scale, args.max_scale, not args.no_blur)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=False,
        persistent_workers=args.workers > 0, worker_init_fn=worker_init)
    crops = sum(args.nmb)

    def one_pass():
        start = time.perf_counter()
        seen = 0
        for batch in loader:
            assert len(batch) == crops
            seen += batch[0].shape[0]
        assert seen == len(dataset)
        return len(dataset) / (time.perf_counter() - start)

    one_pass()  # warm-up: worker start, imports, file cache
    rates = [one_pass() for _ in range(args.passes)]
    print(json.dumps({"imagesPerSecond": rates, "images": len(dataset), "workers": args.workers,
                      "torch": torch.__version__, "pil": Image.__version__}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        _, _, jpeg_folder, jpegs, png_folder, pngs = sys.argv
        generate(Path(jpeg_folder), int(jpegs), Path(png_folder), int(pngs))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["time"])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--nmb", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--size", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--min-scale", type=float, nargs="+", default=[0.14, 0.05])
    parser.add_argument("--max-scale", type=float, nargs="+", default=[1.0, 0.14])
    parser.add_argument("--no-blur", action="store_true")
    time_loader(parser.parse_args())


if __name__ == "__main__":
    main()
