"""Training throughput: images/s of ``maskray train`` with 1 vs 2 Ray Train workers on CPU.

The anchor is the 1-worker run measured in the same invocation; the ratio printed is the
scaling efficiency ``ips(2 workers) / (2 * ips(1 worker))`` (1.0 = perfect). Every worker uses
one torch thread, so on a 2-core machine the 2-worker run has the same cores per worker. The
rate is that of the last logging interval (start-up, first-batch and evaluation excluded).

With CUDA (``--gpu``, on by default when a GPU is visible) it also measures R50-FPN at
800x1333 with AMP: images/s per GPU of our engine (1 GPU worker) vs torchvision's reference
loop (``maskrcnn_resnet50_fpn``, plain SGD + ``torch.autocast`` + GradScaler) on the same data.

    python benchmarks/train.py [--iters 30] [--size 128] [--images 64]

``--startup`` instead measures where Ray Train's start-up goes for the demo's config
(``configs/shapes-cpu.yaml``, 2 workers, 4 iterations on 64 images): the driver's planning,
``ray.init`` and trainer set-up (``TrainResult.timings``), then the workers' own marks
(worker process running, model built, DDP ready, first batch), in seconds after ``fit()`` began.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))


def make_data(root: str, images: int, size: int) -> str:
    from train_support import make_shapes_dataset

    train = os.path.join(root, f"train-{size}")
    if not os.path.exists(os.path.join(train, "manifest.json")):
        make_shapes_dataset(train, images=images, seed=0, size=size, images_per_shard=max(8, images // 4))
    return train


def cpu_config(train: str, runs: str, workers: int, iters: int, size: int) -> dict:
    from train_support import tiny_config

    return tiny_config(train, "", runs, f"bench-{workers}w", num_workers=workers, cpus_per_worker=0.75,
                       threads_per_worker=1, log_every=iters // 3, **{
                           "schedule.max_iters": iters, "schedule.warmup_iters": 5,
                           "checkpoint.every": 0, "data.decode_cpus": 0.25, "data.decode_tasks": 1,
                           "model.min_size": size, "model.max_size": size,
                           "model.options.anchor_sizes": [[16], [32], [64], [128], [256]]})


def run_train(config: dict, path: str) -> float:
    from pipeline.train import fit, load_config
    from train_support import write_config

    write_config(path, config)
    result = fit(load_config(path))
    print(f"{config['name']}: driver-side start-up {result.timings}", flush=True)
    return float(result.metrics["images_per_s"])


def gpu_benchmark(iters: int) -> None:
    import torch
    import torchvision

    from model.maskrcnn import build_maskrcnn

    def images_per_s(model, amp=True, batch=2):
        model.cuda().train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda")
        g = torch.Generator().manual_seed(0)
        ims = [torch.rand(3, 800, 1333, generator=g).cuda() for _ in range(batch)]
        boxes = torch.tensor([[100.0, 100.0, 400.0, 500.0], [600.0, 200.0, 900.0, 700.0]]).cuda()
        masks = torch.zeros(2, 800, 1333, dtype=torch.uint8, device="cuda")
        masks[0, 100:500, 100:400] = 1
        masks[1, 200:700, 600:900] = 1
        tg = [{"boxes": boxes, "labels": torch.tensor([1, 2]).cuda(), "masks": masks} for _ in range(batch)]
        for i in range(iters + 5):
            if i == 5:
                torch.cuda.synchronize()
                t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = sum(model(ims, tg).values())
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        torch.cuda.synchronize()
        return iters * batch / (time.perf_counter() - t)

    ref = images_per_s(torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None))
    ours = images_per_s(build_maskrcnn(backbone="resnet50", num_classes=91))
    print(f"GPU R50-FPN 800x1333 AMP, batch 2: torchvision reference loop {ref:.2f} img/s, "
          f"maskray model {ours:.2f} img/s, ratio {ours / ref:.2f}")


def startup(images: int) -> None:
    """One short run of the demo's train config; prints the start-up breakdown."""
    import logging

    from pipeline.train import fit, load_config

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("pipeline.train.engine").addHandler(Keep())
    logging.getLogger("pipeline.train.engine").setLevel(logging.INFO)
    root = tempfile.mkdtemp(prefix="maskray-bench-startup-")
    train = make_data(root, images, 128)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(repo, "configs", "shapes-cpu.yaml"), [
        f"data.train={train}", "data.val=", f"storage_path={root}/runs", "name=startup",
        "schedule.max_iters=4", "schedule.warmup_iters=2", "schedule.steps=[]", "log_every=2"])
    t = time.perf_counter()
    result = fit(config)
    total = time.perf_counter() - t
    print(f"fit() of 4 iterations: {total:.1f} s; driver side: {result.timings}")
    for line in lines:
        if line.startswith(("start-up", "iter ")):
            print("  " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--startup", action="store_true", help="measure Ray Train's start-up instead")
    args = parser.parse_args()
    if args.startup:
        import ray

        from pipeline import raysetup

        raysetup.init(num_cpus=2)
        try:
            startup(args.images)
        finally:
            ray.shutdown()
        return 0

    import ray
    import torch

    root = tempfile.mkdtemp(prefix="maskray-bench-train-")
    train = make_data(root, args.images, args.size)
    from pipeline import raysetup  # Ray as the train job starts it (Ray Data idle-loop pacing)

    raysetup.init(num_cpus=2)
    try:
        results = {}
        for workers in (1, 2):
            config = cpu_config(train, os.path.join(root, "runs"), workers, args.iters, args.size)
            results[workers] = run_train(config, os.path.join(root, f"bench-{workers}.yaml"))
            print(f"CPU {workers} worker(s) x 1 thread, {args.size}px R18-FPN, 2 img/worker: "
                  f"{results[workers]:.2f} img/s", flush=True)
    finally:
        ray.shutdown()
    eff = results[2] / (2 * results[1])
    print(f"scaling efficiency 2 vs 1 workers: {eff:.2f} (speed-up {results[2] / results[1]:.2f}x)")
    if args.gpu or (args.gpu is None and torch.cuda.is_available()):
        gpu_benchmark(args.iters)
    else:
        print("GPU part skipped: no CUDA device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
