"""Mask R-CNN's Table 2 on our data: every ablation switch trained and evaluated the same way.

Each variant changes one switch of the baseline (the paper's choices: RoIAlign, per-class sigmoid
masks, class-specific masks, an FCN mask head) and is trained from scratch on the same synthetic
shapes (``pipeline.data.synth``, exact masks, written to shards by ``convert_coco`` as ``make demo``
does) with the same seeds, schedule, data order and augmentation, then scored (COCO mask AP / AP50
/ AP75, box AP beside) on the same held-out split:

* 2c poolers: ``roipool``, ``roiwarp``, ``roialign`` (the baseline), ``roialign_v2``;
* 2b mask loss: ``softmax`` vs the baseline's sigmoid;
* class-agnostic masks (``agnostic``) vs the baseline's class-specific ones (the paper's text);
* 2e mask head: ``mlp`` vs the baseline's FCN.

The model, config and training step are the demo's (``configs/shapes-cpu.yaml`` with ``--set``
style overrides, :func:`pipeline.train.loop.setup` and :func:`~pipeline.train.loop.train_step`:
what every Ray Train worker runs), driven in this process by one worker so that every variant
sees the same batches in the same order (Ray Data's streaming order and its unseeded augmentation
are not reproducible from run to run). Evaluation is :func:`pipeline.evaluate.evaluate_model`.

Noise: ``--baseline-seeds`` trains the baseline again under other seeds (model init, data order
and augmentation all follow the seed); the spread of its mask AP is the yardstick a variant's
difference is compared with.

kp AP (``--keypoints``): each pooler variant is trained again as the keypoint & mask model of
``configs/keypoints-cpu.yaml`` (``synth --keypoints`` stick figures beside shapes, OKS with the
figures' sigmas), the same recipe and seeds, for Table 2c's kp AP column beside the paper's
Table 6 (R50-FPN keypoint model: RoIPool 59.8, RoIAlign 64.2).

    python benchmarks/ablation.py [--variants all] [--seeds 0] [--baseline-seeds 0,1] [--iters 600]
                                  [--images 600] [--val-images 100] [--size 128] [--keypoints]
                                  [--jobs 2 --threads 1] [--out ablation.json]

``--jobs 2 --threads 1`` trains two runs at once in single-threaded processes (each result is the
one the run gives alone at that thread count): no intra-op threads waiting on each other, which
matters most where other work shares the cores.

Prints one line per trained variant (AP, times) and then the tables beside the paper's numbers
(R50-C4 for 2b/2c, the text for class-agnostic masks, R50-FPN for 2e).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

BASE_CONFIG = os.path.join(ROOT, "configs", "shapes-cpu.yaml")
KEYPOINT_CONFIG = os.path.join(ROOT, "configs", "keypoints-cpu.yaml")  # the joint keypoint & mask model

# variant -> the model fields it changes from the baseline (ModelConfig fields)
VARIANTS: dict[str, dict[str, Any]] = {
    "roialign": {},
    "roialign_v2": {"pooler": "roialign_v2"},
    "roiwarp": {"pooler": "roiwarp"},
    "roipool": {"pooler": "roipool"},
    "softmax": {"mask_loss": "softmax"},
    "agnostic": {"class_agnostic_mask": True},
    "mlp": {"mask_head": "mlp"},
}
BASELINE = "roialign"

# The paper's mask AP / AP50 / AP75 (None: not reported).
PAPER: dict[str, tuple[float | None, float | None, float | None]] = {
    "roipool": (26.9, 48.8, 26.4),  # Table 2c, R50-C4
    "roiwarp": (27.2, 49.2, 27.1),
    "roialign": (30.3, 51.2, 31.5),
    "softmax": (24.8, 44.1, 25.1),  # Table 2b, R50-C4 (sigmoid = the RoIAlign row)
    "agnostic": (29.7, None, None),  # text of §4.2 (class-specific: 30.3)
}
# Table 2e is R50-FPN, another baseline: its own pair
PAPER_2E = {"fcn": (33.6, 55.2, 35.3), "mlp": (31.5, 53.7, 32.8)}

# (title, [(row label, variant, paper numbers)], the paper's claim as an ordered list: best first)
TABLES = [
    ("2c RoI pooling (paper: R50-C4)",
     [("RoIPool", "roipool", PAPER["roipool"]), ("RoIWarp", "roiwarp", PAPER["roiwarp"]),
      ("RoIAlign", "roialign", PAPER["roialign"]), ("RoIAlign v2 (aligned=True)", "roialign_v2", (None,) * 3)],
     ["roialign", "roiwarp", "roipool"]),
    ("2b mask loss (paper: R50-C4)",
     [("sigmoid (per class)", "roialign", PAPER["roialign"]), ("softmax (over classes)", "softmax", PAPER["softmax"])],
     ["roialign", "softmax"]),
    ("class-specific vs class-agnostic masks (paper: text of 4.2, R50-C4)",
     [("class-specific", "roialign", PAPER["roialign"]), ("class-agnostic", "agnostic", PAPER["agnostic"])],
     ["roialign", "agnostic"]),
    ("2e mask head (paper: R50-FPN)",
     [("FCN (4 convs + deconv)", "roialign", PAPER_2E["fcn"]), ("MLP (fc, fc, fc)", "mlp", PAPER_2E["mlp"])],
     ["roialign", "mlp"]),
]
# Table 6 (R50-FPN keypoint model, COCO minival): kp AP of the poolers
PAPER_KP = {"roipool": 59.8, "roialign": 64.2}
KP_POOLERS = ("roipool", "roiwarp", "roialign", "roialign_v2")  # the variants --keypoints trains again
KP_NOT_RUN = "not run (--keypoints)"


@dataclass
class Setup:
    """The shared recipe of every variant."""

    images: int = 600  # train images (synth seed 0)
    val_images: int = 100  # held-out images (synth seed 1)
    size: int = 128  # image side, px (the model's min_size = max_size: no resize)
    iters: int = 600  # SGD steps of `batch` images
    batch: int = 4
    threads: int = 2  # torch intra-op threads
    base_lr: float = 0.02  # for a batch of 4 (the demo's reference_batch)
    warmup: int = 50
    data_dir: str = ""

    def __post_init__(self) -> None:
        if self.images < self.batch or self.val_images < 1 or self.iters < 1 or self.threads < 1:
            raise SystemExit(f"ablation: need images >= batch, val images >= 1, iters >= 1, threads >= 1: {self}")


# --------------------------------------------------------------------------- data


def make_dataset(root: str, *, images: int, seed: int, size: int, keypoints: bool = False) -> str:
    """``maskray synth`` + ``maskray convert`` (local runner) into ``root``; reused when present. Shards URI.

    ``keypoints``: configs/keypoints-cpu.yaml's recipe (``synth --categories 2 --max-objects 3
    --keypoints``: stick figures with 7 keypoints beside circles and squares)."""
    from pipeline.data.convert import convert_coco
    from pipeline.data.synth import synthesize

    shards = os.path.join(root, "shards")
    if os.path.exists(os.path.join(shards, "manifest.json")):
        return shards
    extra = {"num_categories": 2, "max_objects": 3, "keypoints": True} if keypoints else {}
    synthesize(os.path.join(root, "synth"), images=images, seed=seed, size=size, **extra)
    convert_coco(os.path.join(root, "synth", "annotations.json"), os.path.join(root, "synth", "images"), shards,
                 runner="local", workers=2)
    return shards


def batches(rows: list[dict], config, plan, seed: int):
    """``(images, targets)`` batches for ``config.schedule.max_iters`` steps: a permutation of
    ``rows`` per epoch drawn from ``seed``, each row decoded and augmented by the train stream's own
    function (``DecodeAugment``, its random flips seeded by ``seed``), collated as the workers do."""
    import numpy as np

    from pipeline.train.data import DecodeAugment
    from pipeline.train.data import collate

    decode = DecodeAugment([int(c["id"]) for c in plan.categories], config.augment.hflip_prob,
                           tuple(config.augment.scale_jitter), seed=seed, num_keypoints=config.model.num_keypoints,
                           keypoint_flip=plan.keypoint_flip)
    rng = np.random.default_rng(seed)
    batch: list[dict] = []
    while True:
        for index in rng.permutation(len(rows)):
            batch.extend(decode(rows[int(index)]))
            if len(batch) == config.images_per_worker:
                yield collate({key: [row[key] for row in batch] for key in batch[0]})
                batch = []


# --------------------------------------------------------------------------- one variant


def train_config(setup: Setup, train_uri: str, variant: str, seed: int, keypoints: bool = False):
    """The demo's config (configs/shapes-cpu.yaml; with ``keypoints`` its keypoint & mask model,
    configs/keypoints-cpu.yaml) with this recipe and the variant's switches."""
    from pipeline.train.config import load_config

    steps = [int(setup.iters * 0.8)] if setup.iters >= 10 else []
    overrides = [f"data.train={train_uri}", "data.val=", f"seed={seed}", "num_workers=1",
                 f"images_per_worker={setup.batch}", f"threads_per_worker={setup.threads}",
                 f"model.min_size={setup.size}", f"model.max_size={setup.size}",
                 f"optim.base_lr={setup.base_lr}", "optim.reference_batch=4",
                 f"schedule.max_iters={setup.iters}", f"schedule.warmup_iters={min(setup.warmup, setup.iters - 1)}",
                 f"schedule.steps={steps}", f"name=ablation-{'kp-' if keypoints else ''}{variant}-s{seed}",
                 # the demo's anchors (16..256 px at 128 px) scaled with the image: objects are 0.24-0.52 of it
                 f"model.options.anchor_sizes={[[round(a * setup.size / 128)] for a in (16, 32, 64, 128, 256)]}"]
    overrides += [f"model.{key}={json.dumps(value)}" for key, value in VARIANTS[variant].items()]
    return load_config(KEYPOINT_CONFIG if keypoints else BASE_CONFIG, overrides)


def run_variant(setup: Setup, train_uri: str, train_rows: list[dict], val_rows: list[dict], variant: str,
                seed: int, keypoints: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train one variant from scratch and evaluate it: a JSON-able record (``task`` "masks", or
    "keypoints" for the keypoint & mask model; a progress line every quarter of the schedule)."""
    import torch

    from pipeline.evaluate import evaluate_model, metrics_to_json
    from pipeline.train.engine import plan_run
    from pipeline.train.loop import setup as worker_setup
    from pipeline.train.loop import train_step

    config = train_config(setup, train_uri, variant, seed, keypoints)
    task = "keypoints" if keypoints else "masks"
    plan = plan_run(config)
    worker, _ = worker_setup(config, plan, rank=0, world=1, device=torch.device("cpu"))
    t0 = time.perf_counter()
    recent: list[float] = []
    every = max(1, plan.total_iters // 4)
    for images, targets in batches(train_rows, config, plan, seed):
        losses, _ = train_step(worker, images, targets)
        recent = (recent + [losses["loss"]])[-20:]
        if worker.iteration % every == 0 and progress:
            print(f"  {variant} ({task}) seed {seed}: iter {worker.iteration}/{plan.total_iters}  loss "
                  f"{sum(recent) / len(recent):.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
        if worker.iteration >= plan.total_iters:
            break
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    sigmas = {"kpt_oks_sigmas": config.eval.kpt_oks_sigmas or None} if keypoints else {}
    metrics = metrics_to_json(evaluate_model(worker.model, val_rows, plan.categories, batch_size=setup.batch,
                                             **sigmas))
    eval_s = time.perf_counter() - t1
    return {"variant": variant, "task": task, "seed": seed, "switches": VARIANTS[variant], "metrics": metrics,
            "final_loss": sum(recent) / len(recent), "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "iters": plan.total_iters, "images_per_s": round(plan.total_iters * setup.batch / train_s, 2)}


def describe(record: dict[str, Any]) -> str:
    def pct(kind: str, key: str) -> str:
        value = (record["metrics"].get(kind) or {}).get(key)
        return "  -  " if value is None else f"{100 * value:5.1f}"

    kp = f"  kp AP {pct('keypoints', 'AP')}" if record.get("task") == "keypoints" else ""
    return (f"{record['variant']:<12}{' (kp model)' if kp else ''} seed {record['seed']}{kp}  mask AP {pct('segm', 'AP')} AP50 {pct('segm', 'AP50')} "
            f"AP75 {pct('segm', 'AP75')}  box AP {pct('bbox', 'AP')}  loss {record['final_loss']:.3f}  "
            f"train {record['train_s']:.0f} s ({record['iters']} it, {record['images_per_s']:.1f} img/s)  "
            f"eval {record['eval_s']:.0f} s")


# --------------------------------------------------------------------------- the tables


def mean_metric(records: list[dict], variant: str, key: str, kind: str = "segm", task: str = "masks") -> list[float]:
    """The ``kind`` ``key`` values (percent) of ``variant``'s ``task`` runs over their seeds
    (undefined ones left out)."""
    return [100 * r["metrics"][kind][key] for r in records
            if r["variant"] == variant and r.get("task", "masks") == task
            and (r["metrics"].get(kind) or {}).get(key) is not None]


def noise(records: list[dict]) -> float | None:
    """The baseline's mask AP spread (max - min, percent points) over its seeds; None with one seed."""
    values = mean_metric(records, BASELINE, "AP")
    return max(values) - min(values) if len(values) >= 2 else None


def verdict(records: list[dict], order: list[str], spread: float | None) -> str:
    """Whether the paper's ranking ``order`` (best first) holds on mask AP: each neighbouring pair is
    ``holds`` (better by more than the noise), ``reversed`` (worse by more than the noise) or ``within
    noise``; without a noise estimate a pair only holds or is reversed by its sign."""
    means = {}
    for variant in order:
        values = mean_metric(records, variant, "AP")
        if not values:
            return "not measured (" + ", ".join(v for v in order if not mean_metric(records, v, "AP")) + " not run)"
        means[variant] = sum(values) / len(values)
    parts = []
    for better, worse in zip(order, order[1:]):
        diff = means[better] - means[worse]
        word = "holds" if diff > 0 else "reversed"
        if spread is None:
            word += ", no noise estimate"
        elif abs(diff) <= spread:
            word = "within noise"
        parts.append(f"{better} - {worse} = {diff:+.1f} ({word})")
    return "; ".join(parts)


def format_tables(records: list[dict]) -> str:
    """Markdown tables: per Table 2 part, the paper's mask AP/AP50/AP75 beside ours (mean over seeds,
    ``±`` half the range when there are several), box AP, and the paper's direction checked."""
    spread = noise(records)

    def ours(variant: str, key: str, kind: str = "segm", task: str = "masks") -> str:
        values = mean_metric(records, variant, key, kind, task)
        if not values:
            ran = any(r["variant"] == variant and r.get("task", "masks") == task for r in records)
            return "–" if ran or task == "masks" else KP_NOT_RUN
        mean = sum(values) / len(values)
        return f"{mean:.1f}" + (f" ± {(max(values) - min(values)) / 2:.1f}" if len(values) > 1 else "")

    def paper(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    out = []
    seeds = sorted({r["seed"] for r in records if r["variant"] == BASELINE})
    out.append(f"noise: baseline ({BASELINE}) mask AP spread over seeds {seeds}: "
               + ("not measured (one seed)" if spread is None else f"{spread:.1f} points"))
    for title, rows, order in TABLES:
        kp = title.startswith("2c")
        out += ["", f"### {title}", "",
                "| variant | paper AP | paper AP50 | paper AP75 | mask AP | AP50 | AP75 | box AP |"
                + (" paper kp AP (Table 6) | kp AP |" if kp else ""),
                "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if kp else "")]
        for label, variant, numbers in rows:
            cells = [paper(v) for v in numbers] + [ours(variant, k) for k in ("AP", "AP50", "AP75")]
            cells.append(ours(variant, "AP", "bbox"))
            if kp:
                cells += [paper(PAPER_KP.get(variant)), ours(variant, "AP", "keypoints", "keypoints")]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += ["", "paper's direction (" + " > ".join(order) + "): " + verdict(records, order, spread)]
        if kp and any(r.get("task") == "keypoints" for r in records):
            out.append("kp AP: the keypoint & mask model of configs/keypoints-cpu.yaml (stick figures, OKS) trained "
                       "with each pooler, same recipe and seeds; one seed has no noise estimate of its own")
    return "\n".join(out)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


# --------------------------------------------------------------------------- main


def parse_list(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="all", help=f"comma-separated, or all: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="seeds of every variant (comma-separated)")
    parser.add_argument("--baseline-seeds", default="", help=f"further seeds of the baseline ({BASELINE}) "
                                                              "for the noise estimate, e.g. 0,1")
    parser.add_argument("--iters", type=int, default=Setup.iters)
    parser.add_argument("--images", type=int, default=Setup.images, help="train images")
    parser.add_argument("--val-images", type=int, default=Setup.val_images)
    parser.add_argument("--size", type=int, default=Setup.size, help="image side in px")
    parser.add_argument("--batch", type=int, default=Setup.batch)
    parser.add_argument("--threads", type=int, default=Setup.threads)
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once in separate processes (e.g. 2 x --threads 1 on 2 cores)")
    parser.add_argument("--keypoints", action="store_true",
                        help=f"also train the keypoint & mask model with each pooler ({', '.join(KP_POOLERS)}) "
                             "for Table 2c's kp AP")
    parser.add_argument("--data-dir", default="", help="where the datasets go (reused); default: a temporary folder")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--tables-from", nargs="+", default=[], metavar="JSON",
                        help="train nothing: print the tables of the runs in these --out files together")
    args = parser.parse_args(argv)
    if args.tables_from:
        records = []
        for path in args.tables_from:
            with open(path) as f:
                records += json.load(f)["runs"]
        print(format_tables(records))
        return {"runs": records, "noise_mask_AP": noise(records)}

    variants = list(VARIANTS) if args.variants == "all" else parse_list(args.variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    seeds = parse_list(args.seeds, int)
    runs = [(v, s, False) for v in variants for s in seeds]
    runs += [(BASELINE, s, False) for s in parse_list(args.baseline_seeds, int) if (BASELINE, s, False) not in runs]
    if args.keypoints:
        runs += [(v, s, True) for v in variants if v in KP_POOLERS for s in seeds]
    setup = Setup(images=args.images, val_images=args.val_images, size=args.size, iters=args.iters,
                  batch=args.batch, threads=args.threads, data_dir=args.data_dir)

    import torch

    from pipeline.data.format import read_rows

    load_before = uptime()
    print(f"ablation: {len(runs)} runs, {setup}; torch {torch.__version__}; {load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="maskray-ablation-") as tmp:
        root = args.data_dir or tmp
        t0 = time.perf_counter()
        data = {}  # keypoints? -> (train URI, train rows, val rows)
        for keypoints in sorted({kp for _, _, kp in runs}):
            tag = "-kp" if keypoints else ""
            train_uri = make_dataset(os.path.join(root, f"train{tag}-{setup.size}px-{setup.images}"),
                                     images=setup.images, seed=0, size=setup.size, keypoints=keypoints)
            val_uri = make_dataset(os.path.join(root, f"val{tag}-{setup.size}px-{setup.val_images}"),
                                   images=setup.val_images, seed=1, size=setup.size, keypoints=keypoints)
            data[keypoints] = (train_uri, list(read_rows(train_uri)), list(read_rows(val_uri)))
            print(f"data{' (keypoints)' if keypoints else ''}: {len(data[keypoints][1])} train / "
                  f"{len(data[keypoints][2])} val images of {setup.size} px", flush=True)
        print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
        records = []
        if args.jobs == 1:
            for variant, seed, keypoints in runs:
                record = run_variant(setup, *data[keypoints], variant, seed, keypoints)
                records.append(record)
                print(describe(record), flush=True)
        else:  # runs in parallel processes; each result is what it would be alone (same threads, same batches)
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(run_variant, setup, *data[keypoints], variant, seed, keypoints)
                           for variant, seed, keypoints in runs]
                for future in as_completed(futures):
                    print(describe(future.result()), flush=True)
            records = [future.result() for future in futures]  # in run order
    load_after = uptime()
    print(f"load after: {load_after}")
    print()
    print(format_tables(records))
    result = {"setup": dataclasses.asdict(setup), "load_before": load_before, "load_after": load_after,
              "runs": records, "paper": {**PAPER, **{f"2e_{k}": v for k, v in PAPER_2E.items()}},
              "paper_kp": PAPER_KP, "noise_mask_AP": noise(records)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
