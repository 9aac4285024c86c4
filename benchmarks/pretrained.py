"""torchvision's R50-FPN Mask R-CNN on CPU: ``maskray infer`` at its defaults vs torchvision's model in
a plain loop, same weights, same score threshold (0.05), same images, in one run (issue 23 item 5).

Weights: torchvision's ``maskrcnn_resnet50_fpn_v2`` builder, seeded and calibrated
(``tests/pretrained_files.py``: scores spread like a trained model's, "N/A" labels scored low), saved
as a plain state dict under the published file name, the file a user downloads.

Anchor (timed per image, in this process, torch's default threads): decode the file (PIL, EXIF
applied), ``model([image])`` in ``eval()`` and ``torch.inference_mode()`` (800 px, masks pasted
full-size by torchvision), then every mask RLE-encoded with pycocotools: what a user of
torchvision writes to get COCO results.

Ours: ``maskray infer --checkpoint FILE --input DIR --output OUT`` as a separate command at its
defaults (start-up, Ray, actor, model load and results writing included; wall time of the command).

Inputs, made here from the photographs in scikit-image's wheel (nothing downloads):
  * COCO-size: ``--photos`` JPEGs with the long side 640 px (goal >= 1.3x);
  * 12-MP: ``--big`` 4000x3000 JPEGs, each with >= 50 instances (checked; goal >= 5x).

    python benchmarks/pretrained.py [--photos 16] [--big 2] [--amp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import pretrained_files as pf  # noqa: E402

PHOTOS = ("rocket", "coffee", "motorcycle_left", "astronaut", "chelsea", "hubble_deep_field")
SCORE_THRESHOLD = 0.05  # torchvision's box_score_thresh and maskray infer's default


def make_inputs(folder: str, count: int, size: tuple[int, int] | None, long_side: int | None) -> list[str]:
    """``count`` JPEGs (quality 95) cycling over :data:`PHOTOS`: resized to ``size`` (W, H) or to a
    long side of ``long_side`` px."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.fromarray(pf.photo(PHOTOS[i % len(PHOTOS)]))
        if size is not None:
            image = ImageOps.fit(image, size, Image.BICUBIC)
        else:
            scale = long_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        if (i // len(PHOTOS)) % 2:  # the second pass over the photos mirrored: other pixels, same content
            image = ImageOps.mirror(image)
        path = os.path.join(folder, f"{i:05d}.jpg")
        image.save(path, quality=95)
        paths.append(path)
    return paths


def plain_loop(model: torch.nn.Module, paths: list[str]) -> dict:
    """The anchor: per image decode, torchvision's model, RLE of every pasted mask."""
    from pycocotools import mask as mask_utils

    times = {"decode": 0.0, "model": 0.0, "encode": 0.0}
    instances = []
    start = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        with Image.open(path) as im:
            array = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        image = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model([image])[0]
        t2 = time.perf_counter()
        binary = (out["masks"][:, 0] > 0.5).numpy()
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary]
        t3 = time.perf_counter()
        times["decode"] += t1 - t0
        times["model"] += t2 - t1
        times["encode"] += t3 - t2
        instances.append(len(rles))
        del out, binary
    times["total"] = time.perf_counter() - start
    return {"seconds": times, "instances": instances}


def maskray_infer(weights: str, folder: str, out: str, *extra: str) -> dict:
    """``maskray infer`` at its defaults (plus ``extra`` flags), as a command; wall time and its
    summary line."""
    command = [sys.executable, "-m", "jobs.infer", "--checkpoint", weights, "--input", folder, "--output", out,
               *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"maskray infer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    import pyarrow.parquet as pq

    counts = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".parquet"):
            counts += [len(r) for r in pq.read_table(os.path.join(out, name), columns=["instances"])
                       .column("instances").to_pylist()]
    return {"seconds": seconds, "summary": done.stdout.strip().splitlines()[-1], "instances": counts}


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=16, help="COCO-size photos (long side 640 px)")
    parser.add_argument("--big", type=int, default=2, help="12-MP photos (4000x3000)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--amp", action="store_true",
                        help="also time maskray infer --amp on (bfloat16 autocast on CPU: not the default, "
                             "its results differ from float32's)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="maskray-pretrained-")
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {load_average()}")
    path, model = pf.write_torchvision_file(os.path.join(work, "weights"), "maskrcnn_resnet50_fpn_v2", seed=0,
                                            calibrate_on=pf.as_tensor(pf.photo("rocket")), na_offset=3.0)
    model.eval()
    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "weights": os.path.basename(path)}
    sets = [("coco-size", args.photos, None, 640), ("12-MP", args.big, (4000, 3000), None)]
    for label, count, size, long_side in sets:
        if count < 1:
            continue
        folder = os.path.join(work, label)
        paths = make_inputs(folder, count, size, long_side)
        loop = plain_loop(model, paths)
        ours = maskray_infer(path, folder, os.path.join(work, f"out-{label}"))
        ratio = loop["seconds"]["total"] / ours["seconds"]
        s = loop["seconds"]
        print(f"{label}: {count} photos  torchvision loop {s['total']:.1f} s (decode {s['decode']:.1f}, model+paste "
              f"{s['model']:.1f}, RLE {s['encode']:.1f}; {count / s['total']:.3f} images/s)  maskray infer "
              f"{ours['seconds']:.1f} s ({count / ours['seconds']:.3f} images/s)  ratio {ratio:.2f}x (defaults)")
        print(f"   instances per image: loop {loop['instances']}, maskray {ours['instances']}")
        print(f"   maskray: {ours['summary']}")
        if label == "12-MP" and min(ours["instances"]) < 50:
            print(f"   WARNING: a 12-MP photo has {min(ours['instances'])} < 50 instances")
        results[label] = {"photos": count, "loop": loop, "maskray": ours, "ratio": ratio}
        if args.amp:
            amp = maskray_infer(path, folder, os.path.join(work, f"out-{label}-amp"), "--amp", "on")
            results[label]["maskray_amp"] = amp
            results[label]["ratio_amp"] = loop["seconds"]["total"] / amp["seconds"]
            print(f"   maskray infer --amp on (bfloat16 on CPU): {amp['seconds']:.1f} s, ratio "
                  f"{results[label]['ratio_amp']:.2f}x; instances {amp['instances']}")
    print(f"load after: {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
