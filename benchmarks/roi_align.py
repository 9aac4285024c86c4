"""Benchmark: our RoIAlign (torch.ops.maskray) vs torchvision.ops.roi_align, same run.

Mask R-CNN shapes: the FPN pyramid 2x256x(200x272 .. 25x34) of 800x1088 images (and, with
``--cases single``, its finest level alone), 1,000 proposal-like RoIs per image, 7x7 box head and
14x14 mask head, sampling ratio 2. Prints forward and forward+backward times and ratios (> 1
means ours is faster):

* FPN: our fused pooler (``model.ops.MultiScaleRoIAlign``: one ``multi_level_roi_align`` call)
  against torchvision's ``MultiScaleRoIAlign`` and against the per-level pooler that landed
  before it (one ``roi_align`` call per level plus level mapping and a gather; kept here as
  :func:`per_level_pooler` for this comparison);
* single level: ``model.ops.roi_align`` against ``torchvision.ops.roi_align`` (aligned).

CPU runs with torch.set_num_threads(2); on CUDA it also reports achieved memory bandwidth
against a device-to-device copy measured in the same run (and the device's nominal peak), and
our deterministic backward next to the default atomic one.

    python benchmarks/roi_align.py [--device cpu cuda] [--cases fpn single] [--repeat N] [--rois-per-image 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torchvision  # noqa: E402

from model import ops  # noqa: E402

IMAGE = (800, 1088)
BATCH, CHANNELS = 2, 256
# nominal peak DRAM bandwidth (bytes/s) by device-name fragment
NOMINAL_PEAK = {"H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12,
                "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12}


def make_boxes(per_image_rois: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Proposal-like boxes for each of the BATCH images: log-uniform sizes 16..512 px, centres uniform."""
    per_image = []
    for count in [per_image_rois] * BATCH:
        size = torch.exp(torch.empty(count, 2).uniform_(torch.log(torch.tensor(16.0)).item(),
                                                        torch.log(torch.tensor(512.0)).item(), generator=generator))
        centre = torch.rand(count, 2, generator=generator) * torch.tensor([IMAGE[1], IMAGE[0]])
        x1y1 = (centre - size / 2).clamp(min=0)
        x2y2 = torch.minimum(centre + size / 2, torch.tensor([IMAGE[1] - 1.0, IMAGE[0] - 1.0]))
        per_image.append(torch.cat([x1y1, x2y2], 1))
    return per_image


def timeit(fn, device: str, repeat: int) -> tuple[float, float]:
    """Median wall seconds per call and, on CPU, median process CPU seconds (after a warm-up call).

    The CPU figure (all threads together) is robust to other load on a shared machine.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            wall.append(start.elapsed_time(end) / 1e3)
            cpu.append(float("nan"))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def per_level_pooler(pyramid: OrderedDict, boxes: list[torch.Tensor], output_size: int, sampling_ratio: int,
                     image_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """The FPN pooler as it landed before the fused op: torchvision's level mapping, one
    ``roi_align`` call per level, then ONE gather putting the rows back in RoI order."""
    from torchvision.ops import poolers

    features = list(pyramid.values())
    scales, mapper = poolers._setup_scales(features, image_shapes, 224, 4)
    rois = poolers._convert_to_roi_format(boxes)
    levels = mapper(boxes)
    order, pooled = [], []
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx_in_level = torch.where(levels == level)[0]
        order.append(idx_in_level)
        pooled.append(ops._roi_align(feature, rois[idx_in_level], output_size, scale, sampling_ratio, False))
    order_all = torch.cat(order)
    pooled.append(pooled[0].new_zeros((1,) + tuple(pooled[0].shape[1:])))
    position = torch.full((rois.size(0),), order_all.numel(), dtype=torch.int64, device=rois.device)
    position[order_all] = torch.arange(order_all.numel(), device=rois.device)
    return torch.cat(pooled)[position]


def cases(device: str, per_image_rois: int, which: list[str], channels: int = CHANNELS, sizes=(7, 14),
          dtype=torch.float32):
    """(name, {label: fn(*inputs) -> out}, input tensors) per benchmark case; the first fn is ours."""
    g = torch.Generator().manual_seed(0)
    boxes = [b.to(device, dtype) for b in make_boxes(per_image_rois, g)]
    rois = ops.convert_boxes_to_roi_format(boxes)
    pyramid = OrderedDict(
        (str(i), torch.randn(BATCH, channels, IMAGE[0] // 4 >> i, IMAGE[1] // 4 >> i, generator=g).to(device, dtype))
        for i in range(4)
    )
    shapes = [IMAGE] * BATCH
    out = []
    if "fpn" in which:
        for size in sizes:
            ours = ops.MultiScaleRoIAlign(list(pyramid), size, 2)
            theirs = torchvision.ops.MultiScaleRoIAlign(list(pyramid), size, 2)
            out.append((
                f"FPN 4 levels 200x272..25x34, {size}x{size}",
                {
                    "ours": lambda *x, m=ours: m(OrderedDict(zip(pyramid, x)), boxes, shapes),
                    "per-level": lambda *x, s=size: per_level_pooler(OrderedDict(zip(pyramid, x)), boxes, s, 2, shapes),
                    "tv": lambda *x, m=theirs: m(OrderedDict(zip(pyramid, x)), boxes, shapes),
                },
                tuple(pyramid.values()),
            ))
    if "single" in which:
        feat = pyramid["0"]
        for size in sizes:
            out.append((
                f"single level 200x272, {size}x{size}",
                {
                    "ours": lambda x, s=size: ops.roi_align(x, rois, s, 0.25, 2, True),
                    "tv": lambda x, s=size: torchvision.ops.roi_align(x, rois, s, 0.25, 2, True),
                },
                (feat,),
            ))
    return out


def run_case(fn, inputs, device: str, repeat: int, deterministic: bool = False):
    """((fwd wall, cpu), (fwd+bwd wall, cpu), output shape) of fn on inputs."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.no_grad():
        fwd = timeit(lambda: fn(*inputs), device, repeat)  # (wall, cpu)
    out = fn(*leaves)
    grad = torch.randn_like(out)

    def fwd_bwd():
        torch.autograd.grad(fn(*leaves), leaves, grad)

    torch.use_deterministic_algorithms(deterministic)
    try:
        fb = timeit(fwd_bwd, device, repeat)
    finally:
        torch.use_deterministic_algorithms(False)
    return fwd, fb, out.shape


def bench(device: str, repeat: int, per_image_rois: int, which: list[str], channels: int = CHANNELS,
          sizes=(7, 14)) -> None:
    print(f"\n== {device}: {torch.cuda.get_device_name() if device == 'cuda' else cpu_name()}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"{per_image_rois} RoIs x {BATCH} images, {channels} channels, median of {repeat}")
    peak = copy_bw = None
    if device == "cpu":
        print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    if device == "cuda":
        big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
        t, _ = timeit(lambda: big.clone(), "cuda", 10)
        copy_bw = 2 * big.numel() / t
        del big
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in NOMINAL_PEAK.items() if k in name), None)
        print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s"
              + (f"; nominal peak {peak / 1e9:.0f} GB/s" if peak else ""))
    header = f"{'case':36s} {'pass':16s} {'ours ms':>9s} {'other':>10s} {'other ms':>9s} {'other/ours':>10s}"
    if device == "cpu":
        header += f" {'ours cpu-ms':>11s} {'other cpu-ms':>12s} {'cpu ratio':>9s}"
    if device == "cuda":
        header += f" {'ours GB/s':>10s} {'%copy':>6s}" + (" %peak" if peak else "")
    print(header)
    for name, fns, inputs in cases(device, per_image_rois, which, channels, sizes):
        ours = fns["ours"]
        f_ours, fb_ours, shape = run_case(ours, inputs, device, repeat)
        in_bytes = sum(t.numel() * t.element_size() for t in inputs)
        out_bytes = shape.numel() * inputs[0].element_size()
        # Minimum DRAM traffic: forward reads the feature maps once and writes the output;
        # forward+backward adds reading the output gradient and writing the input gradients.
        traffic = {"fwd": in_bytes + out_bytes, "fwd+bwd": 2 * (in_bytes + out_bytes)}
        rows = []
        for label, fn in fns.items():
            if label == "ours":
                continue
            f_o, fb_o, _ = run_case(fn, inputs, device, repeat)
            rows += [("fwd", f_ours, label, f_o), ("fwd+bwd", fb_ours, label, fb_o)]
        if device == "cuda":
            _, fb_det, _ = run_case(ours, inputs, device, repeat, deterministic=True)
            rows.append(("fwd+bwd determ.", fb_det, "ours atomic", fb_ours))
        for label, (t_ours, c_ours), other, (t_o, c_o) in rows:
            line = f"{name:36s} {label:16s} {t_ours * 1e3:9.2f} {other:>10s} {t_o * 1e3:9.2f} {t_o / t_ours:9.2f}x"
            if device == "cpu":
                line += f" {c_ours * 1e3:11.1f} {c_o * 1e3:12.1f} {c_o / c_ours:8.2f}x"
            if device == "cuda":
                bw = traffic["fwd+bwd" if label.startswith("fwd+bwd") else "fwd"] / t_ours
                line += f" {bw / 1e9:10.0f} {100 * bw / copy_bw:5.0f}%"
                if peak:
                    line += f" {100 * bw / peak:4.0f}%"
            print(line, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--cases", nargs="+", default=["fpn"], choices=["fpn", "single"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rois-per-image", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14], help="pooled sizes (default 7 14)")
    parser.add_argument("--channels", type=int, default=CHANNELS, help=f"feature channels (default {CHANNELS})")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for device in args.device:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n== cuda: no GPU visible, skipped")
            continue
        bench(device, args.repeat, args.rois_per_image, args.cases, args.channels, args.sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
