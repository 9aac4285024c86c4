"""Benchmark: our RoIAlign (torch.ops.maskray) vs torchvision.ops.roi_align, same run.

Mask R-CNN shapes: a 2x256x200x272 feature map (stride 4 of 800x1088 images) and the FPN
pyramid (200x272 .. 25x34), 512 RoIs, 7x7 box head and 14x14 mask head, sampling ratio 2,
aligned. Prints forward and forward+backward times and the torchvision/ours ratio (> 1 means
we are faster). CPU runs with torch.set_num_threads(2); the CUDA part runs when a GPU is
visible and also reports achieved memory bandwidth against a device-to-device copy and the
device's nominal peak.

    python benchmarks/roi_align.py [--device cpu cuda] [--repeat N] [--rois 512]
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


def make_boxes(num_rois: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Proposal-like boxes: log-uniform sizes 16..512 px, centres uniform in the image."""
    per_image = []
    for count in (num_rois // 2, num_rois - num_rois // 2):
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


def cases(device: str, num_rois: int, dtype=torch.float32):
    """(name, ours(requires_grad_input) -> out, theirs(...) -> out, input tensors) per benchmark case."""
    g = torch.Generator().manual_seed(0)
    boxes = [b.to(device, dtype) for b in make_boxes(num_rois, g)]
    rois = ops.convert_boxes_to_roi_format(boxes)
    feat = torch.randn(BATCH, CHANNELS, IMAGE[0] // 4, IMAGE[1] // 4, generator=g).to(device, dtype)
    pyramid = OrderedDict(
        (str(i), torch.randn(BATCH, CHANNELS, IMAGE[0] // 4 >> i, IMAGE[1] // 4 >> i, generator=g).to(device, dtype))
        for i in range(4)
    )
    out = []
    for size in (7, 14):
        out.append((
            f"single level 200x272, {size}x{size}",
            lambda x, s=size: ops.roi_align(x, rois, s, 0.25, 2, True),
            lambda x, s=size: torchvision.ops.roi_align(x, rois, s, 0.25, 2, True),
            feat,
        ))
    for size in (7, 14):
        ours = ops.MultiScaleRoIAlign(list(pyramid), size, 2)
        theirs = torchvision.ops.MultiScaleRoIAlign(list(pyramid), size, 2)
        out.append((
            f"FPN levels 200x272..25x34, {size}x{size}",
            lambda *x, m=ours: m(OrderedDict(zip(pyramid, x)), boxes, [IMAGE] * BATCH),
            lambda *x, m=theirs: m(OrderedDict(zip(pyramid, x)), boxes, [IMAGE] * BATCH),
            tuple(pyramid.values()),
        ))
    return out


def run_case(fn, inputs, device: str, repeat: int):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.no_grad():
        fwd = timeit(lambda: fn(*inputs), device, repeat)  # (wall, cpu)
    out = fn(*leaves)
    grad = torch.randn_like(out)

    def fwd_bwd():
        torch.autograd.grad(fn(*leaves), leaves, grad)

    return fwd, timeit(fwd_bwd, device, repeat), out.shape


def bench(device: str, repeat: int, num_rois: int) -> None:
    print(f"\n== {device}: {torch.cuda.get_device_name() if device == 'cuda' else cpu_name()}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}")
    peak = copy_bw = None
    if device == "cpu":
        print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    if device == "cuda":
        big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
        t, _ = timeit(lambda: big.clone(), "cuda", 10)
        copy_bw = 2 * big.numel() / t
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in NOMINAL_PEAK.items() if k in name), None)
        print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s"
              + (f"; nominal peak {peak / 1e9:.0f} GB/s" if peak else ""))
    header = f"{'case':38s} {'pass':9s} {'ours ms':>9s} {'tv ms':>9s} {'tv/ours':>8s}"
    if device == "cpu":
        header += f" {'ours cpu-ms':>11s} {'tv cpu-ms':>10s} {'cpu ratio':>9s}"
    if device == "cuda":
        header += f" {'ours GB/s':>10s} {'%copy':>6s}" + (" %peak" if peak else "")
    print(header)
    for name, ours, theirs, inputs in cases(device, num_rois):
        f_ours, fb_ours, shape = run_case(ours, inputs, device, repeat)
        f_tv, fb_tv, _ = run_case(theirs, inputs, device, repeat)
        ins = inputs if isinstance(inputs, tuple) else (inputs,)
        in_bytes = sum(t.numel() * t.element_size() for t in ins)
        out_bytes = shape.numel() * ins[0].element_size()
        # Minimum DRAM traffic: forward reads the feature map once and writes the output;
        # forward+backward adds reading the output gradient and writing the input gradient.
        traffic = {"fwd": in_bytes + out_bytes, "fwd+bwd": 2 * (in_bytes + out_bytes)}
        for label, (t_ours, c_ours), (t_tv, c_tv) in (("fwd", f_ours, f_tv), ("fwd+bwd", fb_ours, fb_tv)):
            line = f"{name:38s} {label:9s} {t_ours * 1e3:9.2f} {t_tv * 1e3:9.2f} {t_tv / t_ours:7.2f}x"
            if device == "cpu":
                line += f" {c_ours * 1e3:11.1f} {c_tv * 1e3:10.1f} {c_tv / c_ours:8.2f}x"
            if device == "cuda":
                bw = traffic[label] / t_ours
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
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for device in args.device:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n== cuda: no GPU visible, skipped")
            continue
        bench(device, args.repeat, args.rois)
    return 0


if __name__ == "__main__":
    sys.exit(main())
