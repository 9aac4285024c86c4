"""Inference throughput: the Ray Data pipeline (``run_inference``) vs a plain single-process loop.

Anchor, measured in the same run: the plain loop over the same model and the same encoded images
held in memory (decode -> ``Predictor.segment``: model + per-instance paste/RLE), run twice:
with torch's defaults (one batch on every core's OpenMP thread, what ``model(images)`` does) and
with the Predictor's lanes on every core (``threads=os.cpu_count()``, what the pipeline's actor
uses); the faster of the two is the anchor. Then ``run_inference`` over the same images stored as
local shards, with 1 actor and with 2 actors (each a fresh results prefix). Reported per pipeline run:

- end to end: images / wall time of ``run_inference`` (includes starting actors, loading the
  checkpoint in each and writing results);
- steady state: images / time from the first model batch starting (in any actor) to the last
  commit: the rate once actors are up, what a bucket-sized run sees (actor start-up, seconds, is
  paid once per run); the ratio to the plain loop uses this rate (target >= 0.9 with one actor).

With CUDA (guarded): R50-FPN at 800 px with AMP, images/s per GPU through the pipeline and the GPU
busy fraction sampled with ``nvidia-smi`` during the stream.

    python benchmarks/infer.py [--images 48] [--size 128] [--shards 8] [--backbone resnet18] [--actors 1,2] [--threads T]

Plumbing overhead (item 4 of issue 13), one command, ratios printed:

    python benchmarks/infer.py --noop --images 20000 --shards 200 --size 64 --actors 1 --driver-rss 2000,20000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.checkpoint import ModelConfig, build_from_config, save_checkpoint  # noqa: E402
from pipeline.data import format as fmt  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.data.synth import categories_for, make_image  # noqa: E402
from pipeline.config import field_defaults  # noqa: E402
from pipeline.infer.config import InferConfig  # noqa: E402

CATEGORIES = categories_for(4)
INFER_DEFAULTS = field_defaults(InferConfig)



def _write_shard(root: str, index: int, rows: list[dict], *, row_group_size: int):
    """Shard ``index`` of unlabeled ``rows`` under ``root``; its manifest entry."""
    path = fmt.SHARD_PATTERN.format(index=index)
    sink = io.BytesIO()
    pq.write_table(fmt.rows_to_table(rows), sink, row_group_size=row_group_size)
    storage.write_bytes(os.path.join(root, path), sink.getvalue())
    return fmt.ShardInfo(path=path, images=len(rows), instances=0)

def make_dataset(root: str, images: int, shards: int, size: int) -> list[bytes]:
    data = [make_image(11, i, size, CATEGORIES)[0] for i in range(images)]
    per = (images + shards - 1) // shards
    infos = []
    for index in range(shards):
        chunk = data[index * per:(index + 1) * per]
        if not chunk:
            break
        rows = [fmt.make_row(image_id=index * per + i + 1, file_name=f"{index * per + i}.png", width=size,
                             height=size, image=b) for i, b in enumerate(chunk)]
        infos.append(_write_shard(root, index, rows, row_group_size=16))
    fmt.write_manifest(root, fmt.Manifest(categories=CATEGORIES, shards=infos, source="benchmark"))
    return data


def plain_loop(ckpt: str, data: list[bytes], batch_size: int, score_threshold: float, threads: int = 0) -> dict:
    from pipeline.data.decode import decode_image
    from pipeline.infer.predictor import Predictor

    predictor = Predictor(ckpt, score_threshold=score_threshold, threads=threads)
    predictor.predict([decode_image(data[0])])  # warm-up
    instances = 0
    start = time.perf_counter()
    for i in range(0, len(data), batch_size):
        images = [decode_image(b) for b in data[i:i + batch_size]]
        instances += sum(len(found) for found in predictor.segment(images))
    seconds = time.perf_counter() - start
    return {"images": len(data), "seconds": seconds, "images_per_s": len(data) / seconds,
            "instances": instances, "lanes_threads": threads}


class GpuSampler:
    """``nvidia-smi`` utilization samples (percent) every ``interval_ms`` while running."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self._proc = None
        self._thread = None

    def __enter__(self) -> "GpuSampler":
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)

    def busy_fraction(self, threshold: float = 0.0) -> float:
        """Mean utilization / 100 over the samples (trimmed of the idle tail/head below threshold)."""
        s = self.samples
        while s and s[0] <= threshold:
            s = s[1:]
        while s and s[-1] <= threshold:
            s = s[:-1]
        return sum(s) / (100.0 * len(s)) if s else 0.0


def mark_once(path: str, text: str) -> None:
    """Write ``text`` to ``path`` unless it exists (the first writer wins, across processes)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, text.encode())
    os.close(fd)


def timed_predictor(marker: str):
    """A Predictor that records (once, across actors) when the first model batch starts
    (``run_units``: what the model actor calls). Defined in a function so Ray pickles it by value."""
    from pipeline.infer.predictor import Predictor

    class TimedPredictor(Predictor):
        def run_units(self, table, batch_size=None):
            mark_once(marker, repr(time.time()))
            return super().run_units(table, batch_size)

    return TimedPredictor


def pipeline_run(data_uri: str, out_uri: str, ckpt: str, *, actors: int, batch_size: int,
                 score_threshold: float, gpus_per_actor: float | None = None, threads: int | None = None) -> dict:
    """End to end: images / wall of run_inference. Steady: images / (last commit - first model
    batch start), i.e. without starting Ray Data and the actors (checkpoint load, op load)."""
    from pipeline.infer.config import InferConfig
    from pipeline.infer.driver import run_inference

    marker = out_uri.rstrip("/") + ".first-batch"
    commits: list[float] = []
    ticks = cpu_ticks()
    start = time.time()
    summary = run_inference(InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, batch_size=batch_size,
                                        actors=str(actors), gpus_per_actor=gpus_per_actor, threads=threads,
                                        score_threshold=score_threshold),
                            predictor_factory=timed_predictor(marker),
                            on_unit_committed=lambda name: commits.append(time.time()))
    wall = time.time() - start
    steal = steal_since(ticks)
    first_batch = float(open(marker).read())
    return {"actors": actors, "images": summary.images, "errors": summary.errors,
            "instances": summary.instances, "seconds": wall, "images_per_s": summary.images / wall,
            "startup_s": first_batch - start, "steady_images_per_s": summary.images / (commits[-1] - first_batch),
            "first_commit_s": commits[0] - start, "steal": steal}


def write_checkpoint(path: str, backbone: str, size: int, detections: int, proposals: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig.for_categories(
        CATEGORIES, backbone=backbone, min_size=size, max_size=size, box_detections_per_img=detections,
        options={"rpn_pre_nms_top_n_test": 2 * proposals, "rpn_post_nms_top_n_test": proposals})
    save_checkpoint(path, build_from_config(config), config)


def start_ray(**kwargs) -> None:
    """Ray started as ``maskray infer`` starts it (pipeline.raysetup), tried twice (on a heavily
    shared machine the node can time out starting)."""
    import ray

    from pipeline import raysetup

    for attempt in (1, 2):
        try:
            raysetup.init("local", include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
            return
        except Exception as exc:  # noqa: BLE001
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"ray.init failed ({exc}); retrying", flush=True)
            time.sleep(5)


def cpu_benchmark(args: argparse.Namespace, work: str) -> dict:
    import ray

    data_uri = os.path.join(work, "data")
    ckpt = os.path.join(work, "ckpt.pt")
    write_checkpoint(ckpt, args.backbone, args.size, args.detections, args.proposals)
    data = make_dataset(data_uri, args.images, args.shards, args.size)
    # Two anchors: torch's defaults (OpenMP on every core) and the Predictor's lanes on every
    # core; the ratio uses the faster.
    threads = torch.get_num_threads()
    plains = []
    for lanes in (0, os.cpu_count()):
        plains.append(plain_loop(ckpt, data, args.batch_size, args.score_threshold, threads=lanes))
        torch.set_num_threads(threads)
        how = f"lanes on {lanes} threads" if lanes else f"torch defaults ({threads} threads)"
        print(f"plain loop, {how}: {plains[-1]['images_per_s']:.2f} images/s ({plains[-1]['images']} images, "
              f"{plains[-1]['seconds']:.1f} s)", flush=True)
    plain = max(plains, key=lambda p: p["images_per_s"])
    start_ray(num_cpus=os.cpu_count())
    try:
        runs = []
        for actors in args.actors:
            run = pipeline_run(data_uri, os.path.join(work, f"out-{actors}"), ckpt, actors=actors,
                               batch_size=args.batch_size, score_threshold=args.score_threshold,
                               threads=args.threads)
            run["ratio_steady"] = run["steady_images_per_s"] / plain["images_per_s"]
            run["ratio_end_to_end"] = run["images_per_s"] / plain["images_per_s"]
            assert run["images"] == args.images and run["errors"] == 0
            runs.append(run)
            print(f"pipeline, {actors} actor(s): end to end {run['images_per_s']:.2f} images/s "
                  f"({run['seconds']:.1f} s; first model batch at {run['startup_s']:.1f} s, first commit at "
                  f"{run['first_commit_s']:.1f} s), steady {run['steady_images_per_s']:.2f} images/s; ratio to "
                  f"plain loop: steady {run['ratio_steady']:.2f}, end to end {run['ratio_end_to_end']:.2f}; CPU stolen by "
                  f"the host: {100 * run['steal']:.0f}%", flush=True)
    finally:
        ray.shutdown()
    return {"plain": plain, "plain_runs": plains, "pipeline": runs}


def gpu_benchmark(args: argparse.Namespace, work: str) -> dict:
    import ray

    data_uri = os.path.join(work, "gpu-data")
    ckpt = os.path.join(work, "r50.pt")
    torch.manual_seed(0)
    config = ModelConfig.for_categories(CATEGORIES, backbone="resnet50", min_size=800, max_size=1333)
    save_checkpoint(ckpt, build_from_config(config), config)
    make_dataset(data_uri, args.gpu_images, max(1, args.gpu_images // 64), 800)
    gpus = torch.cuda.device_count()
    start_ray()
    try:
        with GpuSampler() as sampler:
            run = pipeline_run(data_uri, os.path.join(work, "gpu-out"), ckpt, actors=gpus,
                               batch_size=args.gpu_batch_size, score_threshold=args.score_threshold,
                               gpus_per_actor=1)
    finally:
        ray.shutdown()
    run["gpus"] = gpus
    run["steady_images_per_s_per_gpu"] = run["steady_images_per_s"] / gpus
    run["gpu_busy_fraction"] = sampler.busy_fraction()
    run["device"] = torch.cuda.get_device_name(0)
    print(f"GPU ({run['device']} x{gpus}), R50-FPN 800 px AMP: steady {run['steady_images_per_s_per_gpu']:.1f} "
          f"images/s per GPU, GPU busy {100 * run['gpu_busy_fraction']:.0f}%", flush=True)
    return run


def noop_predictor(instances: int, marker: str | None = None, load_model: bool = True):
    """A Predictor whose model call does nothing: it loads the checkpoint as the real one does
    (``load_model``: the network built, its weights read and optimized for inference: the real
    model's start-up; False: only the config is read, no network), resizes every image as the
    real one does (``forward_uint8``), and its "model" (``forward_resized``) returns
    ``instances`` fixed synthetic detections per image (boxes + 28x28 soft masks, so
    post-processing and results carry real instances), or none, made once per image size.
    Records (once) when the first model call starts. Defined in a function so Ray pickles it by
    value."""
    from pipeline.infer.predictor import Predictor, read_model_config

    class NoopPredictor(Predictor):
        def __init__(self, checkpoint_uri: str | None = None, *, model=None, config=None, model_id=None,
                     score_threshold: float = 0.0, batch_size: int = 4, threads: int = 0, **_ignored) -> None:
            started = time.time()
            if load_model:
                super().__init__(checkpoint_uri, model=model, config=config, model_id=model_id,
                                 score_threshold=score_threshold, batch_size=batch_size, threads=threads)
                config = self.config
            else:
                if checkpoint_uri is not None:
                    config, model_id = read_model_config(checkpoint_uri)
                self.config, self.model_id, self.batch_size = config, model_id or "", batch_size
                self.score_threshold, self.threads, self.amp = score_threshold, 0, False
                self.device = torch.device("cpu")
                self.category_ids = list(config.category_ids())
            self.sizes = (config.min_size, config.max_size)
            self.outputs: dict = {}
            if marker is not None:
                import psutil  # Ray's own (ray/thirdparty_files), as pipeline.raysetup uses it

                mark_once(marker + ".actor", f"{started!r} {time.time()!r} {psutil.Process().create_time()!r}")

        min_size = property(lambda self: self.sizes[0])
        max_size = property(lambda self: self.sizes[1])

        def prepare(self, image):  # the real predictor's normalize then resize (torchvision's mean/std)
            from pipeline.infer.predictor import resize_for_model

            mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            return resize_for_model((image - mean) / std, *self.sizes)

        def forward_resized(self, images, original_sizes, *, cpu=True):
            if marker is not None:
                mark_once(marker, repr(time.time()))
            return [self.synthetic(*size) for size in original_sizes]

        def synthetic(self, h: int, w: int) -> dict:
            if (h, w) not in self.outputs:
                k = torch.arange(instances, dtype=torch.float32)
                boxes = torch.stack([k % 4 * w / 5, k % 3 * h / 4, k % 4 * w / 5 + w / 5, k % 3 * h / 4 + h / 4], 1)
                yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
                blob = (1.2 - (xx ** 2 + yy ** 2).sqrt()).clamp(0, 1)
                self.outputs[h, w] = {"boxes": boxes, "labels": (k.long() % 4) + 1,
                                      "scores": torch.full((instances,), 0.9),
                                      "masks": blob.expand(instances, 1, 28, 28).contiguous()}
            return self.outputs[h, w]

    return NoopPredictor


def noop_dataset(root: str, images: int, shards: int, size: int) -> None:
    """``images`` PNGs of ``size`` px (64 distinct ones, cycled) in ``shards`` shards."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    distinct = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        distinct.append(buf.getvalue())
    per = images // shards
    infos = []
    for index in range(shards):
        rows = [fmt.make_row(image_id=index * per + i + 1, file_name=f"{index * per + i}.png", width=size,
                             height=size, image=distinct[(index * per + i) % 64]) for i in range(per)]
        infos.append(_write_shard(root, index, rows, row_group_size=64))
    fmt.write_manifest(root, fmt.Manifest(categories=CATEGORIES, shards=infos, source="benchmark"))


def cpu_ticks() -> tuple[int, int]:
    """``(steal, total)`` CPU ticks of this machine so far (``/proc/stat``; zeros elsewhere). Steal is
    time the VM's vCPUs were runnable but the host ran something else: on a shared host it slows
    every process here alike, so the loop and the pipeline are reported with their own share."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    return values[7], sum(values)


def steal_since(before: tuple[int, int]) -> float:
    """Fraction of CPU time stolen by the host since ``before`` (:func:`cpu_ticks`)."""
    after = cpu_ticks()
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def noop_loop(data_uri: str, ckpt: str) -> dict:
    """One process: read every shard, decode, make float and resize as the model would."""
    from pipeline.data.format import read_manifest, shard_uris
    from pipeline.infer.predictor import load_model, model_sizes, resize_for_model, to_float
    from pipeline.infer.stages import decode

    model, _, _ = load_model(ckpt)
    min_size, max_size = model_sizes(model)
    ticks = cpu_ticks()
    start = time.perf_counter()
    n = 0
    for uri in shard_uris(data_uri, read_manifest(data_uri)):
        table = pq.read_table(uri, columns=["image"])
        for data in table.column("image").to_pylist():
            resize_for_model(to_float(decode(data, max_pixels=None)), min_size, max_size)
            n += 1
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "steal": steal_since(ticks)}


def noop_pipeline(data_uri: str, out_uri: str, ckpt: str, *, actors: int, batch_size: int, images_per_unit: int,
                  instances: int, threads: int | None = None, load_model: bool = True) -> dict:
    from pipeline.infer.config import InferConfig
    from pipeline.infer.driver import plan, run_inference

    marker = out_uri.rstrip("/") + ".first-batch"
    commits: list[tuple[float, str]] = []
    ticks = cpu_ticks()
    start = time.time()
    config = InferConfig(input=data_uri, output=out_uri, checkpoint=ckpt, batch_size=batch_size, actors=str(actors),
                         score_threshold=0.0, images_per_unit=images_per_unit, threads=threads)
    summary = run_inference(config, predictor_factory=noop_predictor(instances, marker, load_model),
                            on_unit_committed=lambda name: commits.append((time.time(), name)))
    wall = time.time() - start
    steal = steal_since(ticks)
    first_batch = float(open(marker).read())
    actor_start, actor_ready, actor_process = (float(v) for v in open(marker + ".actor").read().split())
    sizes = {u.unit: u.images for u in plan(data_uri, config.images_per_unit, config.unit_bytes)[0]}
    after_first = summary.images - sizes[commits[0][1]]  # the rate after the first commit
    return {"images": summary.images, "instances": summary.instances, "seconds": wall,
            "images_per_s": summary.images / wall, "first_model_call_s": first_batch - start,
            "actor_process_started_s": actor_process - start, "actor_process_up_s": actor_start - start,
            "actor_ready_s": actor_ready - start,
            "first_commit_s": commits[0][0] - start, "steal": steal, "units": len(sizes),
            "steady_images_per_s": after_first / (commits[-1][0] - commits[0][0]) if len(commits) > 1 else 0.0}


def model_actor_bound(data_uri: str, ckpt: str, images: int, units: int = 20) -> dict:
    """The model actor's own critical path, each part measured alone on this machine: in a fresh
    Python process, importing what the actor imports (Ray Data, torch, torchvision) and loading the
    checkpoint (seconds, wall, timed inside the process: its start and exit not counted), and the
    actor's work per image outside Ray (the no-op :class:`~pipeline.infer.stages.SegmentAndWrite`
    over ``units`` already decoded units: resize, post-process, results file). No end-to-end run of
    ``images`` images can finish before ``imports_and_load_s + images * actor_ms_per_image``,
    however its reads overlap the start-up."""
    import pyarrow as pa

    from pipeline.infer import driver, stages

    code = ("import time; t = time.perf_counter(); import ray.data, torch, torchvision; "
            "from pipeline.infer.predictor import load_model; load_model(%r); print(time.perf_counter() - t)" % ckpt)
    inside = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()[-1])
    plan_units = driver.plan(data_uri, INFER_DEFAULTS["images_per_unit"], INFER_DEFAULTS["unit_bytes"])[0][:units]
    groups = [g for u in plan_units for g in stages.read_groups(pa.Table.from_pylist([u.row()]), max_pixels=None)]
    out = tempfile.mkdtemp(prefix="maskray-bound-")
    try:
        actor = stages.SegmentAndWrite(output_uri=out, category_ids=[c["id"] for c in CATEGORIES],
                                       predictor_factory=noop_predictor(0), checkpoint_uri=ckpt,
                                       batch_size=INFER_DEFAULTS["batch_size"], threads=os.cpu_count())
        for row in actor(groups[0]):  # warm-up: the first call's lazy imports (its file is rewritten below)
            pass
        start = time.perf_counter()
        for g in groups:
            for row in actor(g):
                pass
        per_image = (time.perf_counter() - start) / sum(u.images for u in plan_units)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"imports_and_load_s": inside, "actor_ms_per_image": 1e3 * per_image,
            "bound_s": inside + images * per_image}


def stage_bytes(data_uri: str, ckpt: str, instances: int) -> dict:
    """Bytes per image between stages, measured on the first unit outside Ray."""
    import pyarrow as pa

    from pipeline.infer import driver, stages

    unit = driver.plan(data_uri, 10**9)[0][0]
    decoded = stages.read_units(pa.Table.from_pylist([unit.row()]), max_pixels=None)
    predictor = noop_predictor(instances)(ckpt)
    out = predictor(decoded)
    n = unit.images
    preds = sum(len(p) for p in out.column("preds")[0].as_py())
    return {"decode_to_model_bytes_per_image": stages.pixel_bytes(decoded) / n,
            "model_to_write_bytes_per_image": preds / n,
            "float32_resized_bytes_per_image_before": 4 * decoded.column("pixels")[0].values[0].as_py().__len__()}


def own_peak_rss() -> int:
    """This process's peak RSS in bytes since it started (``VmHWM`` of its own memory map):
    ``getrusage``'s ``ru_maxrss`` is not, as Linux carries it across fork and exec, so a spawned
    child would report its parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def driver_rss_child(data_uri: str, out_uri: str, ckpt: str, instances: int, queue) -> None:
    from ray import cloudpickle

    # A spawned child imports this file as ``__mp_main__``, which cloudpickle would pickle by
    # reference (the Ray workers cannot import it): the predictor and its helpers go by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    before = own_peak_rss()
    start_ray(num_cpus=os.cpu_count())
    run = noop_pipeline(data_uri, out_uri, ckpt, actors=1, batch_size=16, images_per_unit=100, instances=instances)
    import ray

    ray.shutdown()
    queue.put({"images": run["images"], "instances": run["instances"], "driver_peak_rss": own_peak_rss(),
               "rss_before_ray": before})


def _result_of(proc, queue, timeout: float) -> dict:
    """What ``proc`` puts on ``queue``; raises at once if it dies first (its traceback is on stderr)."""
    import queue as queues

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return queue.get(timeout=2)
        except queues.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the driver-RSS child exited with code {proc.exitcode} before reporting")
    proc.kill()
    raise RuntimeError(f"the driver-RSS child reported nothing within {timeout:.0f} s")


def driver_rss(args: argparse.Namespace, work: str, ckpt: str) -> list[dict]:
    """The driver's peak RSS (:func:`own_peak_rss` of a fresh process running ``run_inference``) at each
    of ``args.driver_rss`` image counts, synthetic instances on every image."""
    import multiprocessing as mp

    rss = []
    if args.driver_rss:
        ctx = mp.get_context("spawn")
        for n in args.driver_rss:
            uri = os.path.join(work, f"rss-data-{n}")
            noop_dataset(uri, n, max(1, n // 100), args.size)
            queue = ctx.Queue()
            proc = ctx.Process(target=driver_rss_child, args=(uri, os.path.join(work, f"rss-out-{n}"), ckpt,
                                                              args.noop_instances, queue))
            proc.start()
            rss.append(_result_of(proc, queue, timeout=1200))
            proc.join()
            print(f"driver peak RSS at {n} images ({rss[-1]['instances']} instances): "
                  f"{rss[-1]['driver_peak_rss'] / 2**20:.0f} MiB", flush=True)
        if len(rss) > 1:
            print(f"driver peak RSS growth {args.driver_rss[0]} -> {args.driver_rss[-1]} images: "
                  f"{(rss[-1]['driver_peak_rss'] - rss[0]['driver_peak_rss']) / 2**20:.0f} MiB (target <= 50)", flush=True)
    return rss


class _FloorActor:
    """The floor's model stage: the no-op model actor's imports (torch; the resize and a no-op
    model need no torchvision) and nothing else."""

    def __init__(self) -> None:
        import torch  # noqa: F401

    def __call__(self, batch):
        return batch


def _floor_read(batch):
    return batch


def ray_data_floor(units: int = 200) -> dict:
    """Ray Data's own start-up on a freshly started local Ray: ``units`` one-row items through a
    task stage and a 1-actor pool that only imports torch (the shape of
    :func:`~pipeline.infer.driver.run_inference` with nothing of ours in it). Seconds to the first
    output and to the end; no pipeline can start faster than this on the same machine."""
    import ray
    from ray.data import ActorPoolStrategy

    start_ray(num_cpus=os.cpu_count())
    try:
        start = time.time()
        ds = ray.data.from_items([{"unit": i} for i in range(units)], override_num_blocks=max(1, units // 10))
        ds = ds.map_batches(_floor_read, batch_size=1).map_batches(
            _FloorActor, batch_size=1, compute=ActorPoolStrategy(size=1), num_cpus=1)
        first = None
        for _ in ds.iter_batches(batch_size=None):
            first = first if first is not None else time.time() - start
        return {"first_output_s": first, "seconds": time.time() - start}
    finally:
        ray.shutdown()


def noop_benchmark(args: argparse.Namespace, work: str) -> dict:
    """Plumbing overhead: the pipeline with a no-op model vs one process reading + decoding +
    resizing the same shards; then the driver's peak RSS at 2k and 20k images with instances."""
    import ray

    ckpt = os.path.join(work, "ckpt.pt")
    write_checkpoint(ckpt, args.backbone, args.size, args.detections, args.proposals)
    rss = []
    if args.rss_only:
        return {"driver_rss": driver_rss(args, work, ckpt)}
    data_uri = os.path.join(work, "noop-data")
    noop_dataset(data_uri, args.images, args.shards, args.size)
    loop = noop_loop(data_uri, ckpt)
    print(f"one-process loop (read + decode + resize): {loop['images_per_s']:.0f} images/s "
          f"({loop['images']} images, {loop['seconds']:.1f} s; CPU stolen by the host: "
          f"{100 * loop['steal']:.0f}%)", flush=True)
    sizes = stage_bytes(data_uri, ckpt, args.noop_instances)
    print("bytes per image between stages: decode -> model {decode_to_model_bytes_per_image:.0f} (uint8; "
          "float32 at this size would be {float32_resized_bytes_per_image_before:.0f}), model -> write "
          "{model_to_write_bytes_per_image:.0f}".format(**sizes), flush=True)
    t0 = time.time()
    start_ray(num_cpus=os.cpu_count())
    ray_start = time.time() - t0
    runs = []
    try:
        for k, per_unit in enumerate(args.images_per_unit):  # each a fresh results prefix, Ray kept up
            run = noop_pipeline(data_uri, os.path.join(work, f"noop-out-{k}-{per_unit}"), ckpt, actors=args.actors[0],
                                batch_size=args.batch_size, images_per_unit=per_unit, instances=0,
                                threads=args.threads, load_model=not args.noop_no_model)
            run["images_per_unit"] = per_unit
            run["workers"] = "cold (first run after Ray started)" if k == 0 else "warm (idle workers of the runs before)"
            run["ray_start_s"] = ray_start
            run["ratio_end_to_end"] = run["images_per_s"] / loop["images_per_s"]
            run["ratio_steady"] = run["steady_images_per_s"] / loop["images_per_s"]
            runs.append(run)
            print(f"pipeline, no-op model, {args.actors[0]} actor(s), --images-per-unit {per_unit} ({run['units']} units), {run['workers']}: end to end "
                  f"{run['images_per_s']:.0f} images/s ({run['seconds']:.1f} s), steady {run['steady_images_per_s']:.0f} "
                  f"images/s; ratio to the loop: end to end {run['ratio_end_to_end']:.2f} (target 0.5), steady "
                  f"{run['ratio_steady']:.2f} (target 0.8); start-up: Ray started in {ray_start:.1f} s (before the "
                  f"runs), model actor's process started at {run['actor_process_started_s']:.1f} s, its predictor "
                  f"constructed from {run['actor_process_up_s']:.1f} s (after the process imported Ray Data "
                  f"and torch), its checkpoint loaded at "
                  f"{run['actor_ready_s']:.1f} s, first model call at {run['first_model_call_s']:.1f} s, first results "
                  f"committed at {run['first_commit_s']:.1f} s (target 15); CPU stolen by the host: "
                  f"{100 * run['steal']:.0f}%", flush=True)
    finally:
        ray.shutdown()
    floor = ray_data_floor()
    print(f"Ray Data's own start-up (fresh Ray, trivial task stage + 1 actor importing torch, "
          f"nothing of ours): first output at {floor['first_output_s']:.1f} s = "
          f"{floor['first_output_s'] / loop['seconds']:.2f}x the loop's whole run of {loop['images']} images; "
          f"end to end 0.5x needs every image done in {2 * loop['seconds']:.1f} s", flush=True)
    bound = model_actor_bound(data_uri, ckpt, loop["images"])
    print(f"the model actor's own critical path (each part alone, no Ray): a fresh process importing Ray Data, "
          f"torch, torchvision and loading the checkpoint {bound['imports_and_load_s']:.1f} s, then "
          f"{bound['actor_ms_per_image']:.3f} ms of actor work per image: no run of {loop['images']} images ends "
          f"before {bound['bound_s']:.1f} s = {loop['seconds'] / bound['bound_s']:.2f}x the loop end to end "
          f"at best", flush=True)
    rss = driver_rss(args, work, ckpt)
    return {"loop": loop, "pipeline": runs, "ray_data_floor": floor, "model_actor_bound": bound, "bytes": sizes,
            "driver_rss": rss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--detections", type=int, default=20, help="box_detections_per_img of the model")
    parser.add_argument("--proposals", type=int, default=300, help="RPN proposals kept per image (test)")
    # the CLI's defaults (maskray infer), which users run
    parser.add_argument("--batch-size", type=int, default=INFER_DEFAULTS["batch_size"])
    parser.add_argument("--score-threshold", type=float, default=INFER_DEFAULTS["score_threshold"])
    parser.add_argument("--actors", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per CPU model actor (default: run_inference's, the CPUs shared among the actors); "
                             "--threads 1 shows how the pipeline scales with actors")
    parser.add_argument("--gpu-images", type=int, default=512)
    parser.add_argument("--gpu-batch-size", type=int, default=8)
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--noop", action="store_true",
                        help="plumbing overhead: the model replaced by a no-op, against a read+decode+resize loop "
                             "(use with --images 20000 --shards 200 --size 64)")
    parser.add_argument("--images-per-unit", type=lambda v: [int(x) for x in v.split(",")], default=[INFER_DEFAULTS["images_per_unit"]],
                        help="--noop: images per unit (default: the CLI's); a comma list runs one pipeline per size "
                             "(Ray kept up)")
    parser.add_argument("--noop-no-model", action="store_true",
                        help="--noop: the actor reads only the checkpoint's config (no network built); default: "
                             "it loads the real model, as maskray infer's actor does")
    parser.add_argument("--noop-instances", type=int, default=5,
                        help="--noop: synthetic instances per image for the driver RSS runs")
    parser.add_argument("--rss-only", action="store_true", help="--noop: only the driver RSS runs")
    parser.add_argument("--driver-rss", type=lambda s: [int(v) for v in s.split(",")], default=[],
                        help="--noop: also the driver's peak RSS at these image counts (e.g. 2000,20000)")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="maskray-bench-infer-")
    try:
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                  "load_avg_at_start": os.getloadavg(), "args": vars(args)}
        if args.noop:
            report["noop"] = noop_benchmark(args, work)
            args.no_gpu = True
        else:
            report["cpu"] = cpu_benchmark(args, work)
        if torch.cuda.is_available() and not args.no_gpu:
            report["gpu"] = gpu_benchmark(args, work)
        else:
            print("GPU part skipped (no CUDA device)")
        report["load_avg_at_end"] = os.getloadavg()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
