"""The ``maskray`` command: parses arguments and hands them to a module in ``jobs``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

# subcommand -> (module in jobs, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "run the whole product end to end on synthetic data"),
    "synth": ("jobs.synth", "write a synthetic COCO shapes dataset (PNG + annotations.json)"),
    "convert": ("jobs.convert", "convert a COCO dataset to maskray shards"),
    "pack": ("jobs.pack", "pack a folder or bucket prefix of raw images into unlabeled shards"),
    "train": ("jobs.train", "train Mask R-CNN with Ray Train"),
    "eval": ("jobs.evaluate", "COCO bbox/segm evaluation of a checkpoint on labeled shards"),
    "infer": ("jobs.infer", "batch-segment shards with Ray Data"),
    "distill": ("jobs.distill", "run data-distillation self-training rounds"),
    "show": ("jobs.show", "write PNG overlays of predictions"),
    "submit": ("jobs.submit", "submit a train/infer/distill job to a Ray cluster"),
    "status": ("jobs.submit", "status of a submitted job"),
    "logs": ("jobs.submit", "logs of a submitted job"),
    "stop": ("jobs.submit", "stop a submitted job"),
}


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
    parser = argparse.ArgumentParser(prog="maskray", description=__doc__)
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
