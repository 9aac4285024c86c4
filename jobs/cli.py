"""The ``maskray`` command line (``jobs.cli``): one subcommand per job, each a thin module in ``jobs``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

DESCRIPTION = """\
maskray: instance segmentation (Mask R-CNN) at cluster scale. Train a model on your
COCO-style dataset, segment millions of images with it, and improve it with your
unlabeled images, on one machine or a Ray cluster; data and results in local folders
or object storage (s3://).

The three jobs:
  train     train Mask R-CNN on labeled shards (Ray Train, many workers/GPUs)
  infer     segment images with a trained model (Ray Data); Parquet / COCO JSON results
  distill   self-training rounds: pseudo-label unlabeled images, train a better student

Getting data in: convert (COCO json + images -> shards), pack (raw images -> shards).
Pretrained models: every --checkpoint also takes torchvision:maskrcnn_resnet50_fpn_v2 (and
friends) or a torchvision .pth file; import writes one as a maskray checkpoint.
Looking at results: eval (COCO AP), show (overlay PNGs). On a cluster: submit, status,
logs, stop. To see it all work on synthetic shapes: maskray demo.
"""

# subcommand -> (module in jobs, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jobs.train", "train Mask R-CNN on labeled shards with Ray Train"),
    "infer": ("jobs.infer", "segment images (shards) with a trained model, with Ray Data"),
    "distill": ("jobs.distill", "data-distillation rounds: pseudo-label unlabeled images, train a student"),
    "convert": ("jobs.convert", "convert a COCO dataset (json + images) to maskray shards"),
    "pack": ("jobs.pack", "pack a folder or bucket prefix of raw images into unlabeled shards"),
    "eval": ("jobs.evaluate", "COCO bbox/segm AP of a checkpoint on labeled shards"),
    "import": ("jobs.import_model", "write a maskray checkpoint from torchvision:NAME or a torchvision state dict"),
    "show": ("jobs.show", "write PNG overlays of a model's predictions"),
    "demo": ("jobs.demo", "run the whole product end to end on synthetic shapes"),
    "synth": ("jobs.synth", "write a synthetic COCO shapes dataset (PNG + annotations.json)"),
    "submit": ("jobs.submit", "submit a train/infer/distill job to a Ray cluster"),
    "status": ("jobs.submit", "status of a submitted job"),
    "logs": ("jobs.submit", "logs of a submitted job"),
    "stop": ("jobs.submit", "stop a submitted job"),
}


def version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("maskray")
    except PackageNotFoundError:
        return "unknown"


def configure_logging(verbose: bool) -> None:
    """Plain one-line log records on stderr; ``verbose`` lowers the level to DEBUG."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def build_parser(modules: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """The full parser; ``modules`` maps a subcommand to an imported job module."""
    parser = argparse.ArgumentParser(prog="maskray", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"maskray {version()}")
    parser.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = (modules or {}).get(name) or importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging and full tracebacks")
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(_module=module_name, _runner=getattr(module, f"run_{name}", None) and f"run_{name}")
    return parser


def call(args: argparse.Namespace) -> int:
    """Run the job for parsed ``args`` and return its exit code; exceptions propagate."""
    module = importlib.import_module(args._module)
    runner = getattr(module, args._runner) if args._runner else module.run
    return int(runner(args) or 0)


def invoke(argv: list[str]) -> int:
    """Run ``maskray ARGV…`` in this process (used by ``maskray demo``); exceptions propagate."""
    return call(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Call the job for parsed ``args``; errors become one line unless ``--verbose``."""
    try:
        return call(args)
    except KeyboardInterrupt:
        print("maskray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if getattr(args, "verbose", False):
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if getattr(args, "verbose", False) else "  (run with --verbose for the traceback)"
        print(f"maskray {args.command}: error: {message}{hint}", file=sys.stderr)
        return 1


def module_main(command: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<module>``: the same arguments and code as ``maskray <command>``."""
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", description=help_text)
    parser.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")
    (getattr(module, f"add_{command}_arguments", None) or module.add_arguments)(parser)
    runner = getattr(module, f"run_{command}", None) and f"run_{command}"
    parser.set_defaults(_module=module_name, _runner=runner, command=command)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_command(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
