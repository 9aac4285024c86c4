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
    python benchmarks/pretrained.py --device cuda --photos 16 --big 2    # GPU, no Ray (gpu_check.sh)
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


def source_images() -> tuple[list[np.ndarray], str]:
    """The photographs in scikit-image's wheel, or (where it is not installed: the GPU image) smooth
    random colour fields of the same sizes, and which of the two it is."""
    try:
        return [pf.photo(name) for name in PHOTOS], "scikit-image photographs"
    except ImportError:
        rng = np.random.default_rng(0)
        fields = []
        for h, w in ((427, 640), (400, 600), (500, 741), (512, 512), (300, 451), (872, 1000)):
            small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            fields.append(np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)))
        return fields, "synthetic colour fields (scikit-image is not installed)"


def make_inputs(folder: str, count: int, size: tuple[int, int] | None, long_side: int | None,
                sources: list[np.ndarray]) -> list[str]:
    """``count`` JPEGs (quality 95) cycling over ``sources``: resized to ``size`` (W, H) or to a
    long side of ``long_side`` px."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.fromarray(sources[i % len(sources)])
        if size is not None:
            image = ImageOps.fit(image, size, Image.BICUBIC)
        else:
            scale = long_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        if (i // len(sources)) % 2:  # the second pass over the photos mirrored: other pixels, same content
            image = ImageOps.mirror(image)
        path = os.path.join(folder, f"{i:05d}.jpg")
        image.save(path, quality=95)
        paths.append(path)
    return paths


def decode(path: str) -> torch.Tensor:
    """uint8 ``[3,H,W]`` of an image file, EXIF orientation applied (as both sides decode)."""
    with Image.open(path) as im:
        array = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def plain_loop(model: torch.nn.Module, paths: list[str], device: torch.device) -> dict:
    """The anchor: per image decode, torchvision's model on ``device``, RLE of every pasted mask."""
    from pycocotools import mask as mask_utils

    times = {"decode": 0.0, "model": 0.0, "encode": 0.0}
    instances = []
    start = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        image = decode(path).to(device).float().div(255)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model([image])[0]
        t2 = time.perf_counter()
        binary = (out["masks"][:, 0] > 0.5).cpu().numpy()
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
    from pipeline.results import iter_rows

    counts = [len(row["instances"]) for row in iter_rows(out, ["instances"])]
    return {"seconds": seconds, "summary": done.stdout.strip().splitlines()[-1], "instances": counts}


def predictor_loop(weights: str, paths: list[str], device: torch.device, min_size: int | None) -> dict:
    """Ours without Ray (what one model actor runs; the GPU image has no Ray): the file loaded by
    maskray (Predictor at its defaults on ``device``: AMP on a GPU, float32 on a CPU), per image
    decode and ``segment`` (per-instance paste + RLE). Load time reported apart."""
    from pipeline.infer.predictor import Predictor

    start = time.perf_counter()
    predictor = Predictor(weights, device=str(device), score_threshold=SCORE_THRESHOLD)
    if min_size is not None:
        predictor.min_size = min_size
    loaded = time.perf_counter()
    instances = [len(predictor.segment([decode(path)])[0]) for path in paths]
    done = time.perf_counter()
    return {"seconds": done - start, "load_seconds": loaded - start, "instances": instances,
            "summary": f"Predictor on {device}: load {loaded - start:.1f} s, {len(paths)} images in {done - loaded:.1f} s"}


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
    parser.add_argument("--in-process", action="store_true",
                        help="ours = maskray's Predictor in this process (no Ray: the GPU image), not the command")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda implies --in-process)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="model input size instead of torchvision's 800 (quick checks only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("skipped: no CUDA device")
            return 0
        args.in_process = True

    work = tempfile.mkdtemp(prefix="maskray-pretrained-")
    sources, kind = source_images()
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {load_average()}, "
          f"device {device}; images from {kind}")
    extra = {} if args.min_size is None else {"min_size": args.min_size, "max_size": max(args.min_size, 1333)}
    model = pf.build_torchvision("maskrcnn_resnet50_fpn_v2", 0, **extra)
    pf.calibrate(model, pf.as_tensor(sources[0]))
    path = os.path.join(work, "weights", pf.TORCHVISION_FILES["maskrcnn_resnet50_fpn_v2"])
    os.makedirs(os.path.dirname(path))
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[list(pf.UNUSED_COCO_LABELS)] -= 3.0
    torch.save(pf.torchvision_state_dict(model), path)
    model.eval().to(device)
    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "weights": os.path.basename(path)}
    sets = [("coco-size", args.photos, None, 640), ("12-MP", args.big, (4000, 3000), None)]
    for label, count, size, long_side in sets:
        if count < 1:
            continue
        folder = os.path.join(work, label)
        paths = make_inputs(folder, count, size, long_side, sources)
        loop = plain_loop(model, paths, device)
        if args.in_process:
            ours = predictor_loop(path, paths, device, args.min_size)
        else:
            ours = maskray_infer(path, folder, os.path.join(work, f"out-{label}"))
        ratio = loop["seconds"]["total"] / ours["seconds"]
        s = loop["seconds"]
        print(f"{label}: {count} photos  torchvision loop {s['total']:.1f} s (decode {s['decode']:.1f}, model+paste "
              f"{s['model']:.1f}, RLE {s['encode']:.1f}; {count / s['total']:.3f} images/s)  "
              f"{'maskray Predictor' if args.in_process else 'maskray infer'} "
              f"{ours['seconds']:.1f} s ({count / ours['seconds']:.3f} images/s)  ratio {ratio:.2f}x (defaults)")
        print(f"   instances per image: loop {loop['instances']}, maskray {ours['instances']}")
        print(f"   maskray: {ours['summary']}")
        if label == "12-MP" and min(ours["instances"]) < 50:
            print(f"   WARNING: a 12-MP photo has {min(ours['instances'])} < 50 instances")
        results[label] = {"photos": count, "loop": loop, "maskray": ours, "ratio": ratio}
        if args.amp and not args.in_process:
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
