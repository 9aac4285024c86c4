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

Getting data in: convert (COCO json + images -> shards), pack (raw images -> shards);
export writes shards back as COCO JSON.
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
    "export": ("jobs.export", "write labeled shards back as one COCO JSON file (the reverse of convert)"),
    "eval": ("jobs.evaluate", "COCO bbox/segm/keypoint AP of a checkpoint on labeled shards"),
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


def _flag_type(tp) -> type | None:
    """The argparse type of a scalar config annotation (``int``, ``float``, ``str``, ``X | None``)."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else None
    return tp if tp in (int, float, str, bool) else None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the job config ``cls`` made with ``pipeline.config.option`` (scalar
    fields: ``--images-per-shard N``, booleans ``--exif/--no-exif``), plus ``--set KEY=VALUE``
    for any field. Flags default to None: the config's own default applies, and the config
    validates every value (``config_from_args``)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help")
        tp = _flag_type(hints[f.name])
        if help_text is None or tp is None:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, metavar=f.name.upper(), help=help_text)
    parser.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config field (dotted key, YAML value), e.g. --set images_per_shard=500")


def config_from_args(cls: type, args: argparse.Namespace, **values):
    """The job config ``cls`` from the flags of :func:`add_config_arguments` (those given), then
    ``values`` (set by the job itself), then ``--set`` overrides; one-line ConfigError naming the key."""
    import dataclasses

    from pipeline.config import load

    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("help") is not None and getattr(args, f.name, None) is not None}
    base.update(values)
    return load(cls, None, getattr(args, "set", None) or [], base=base)


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
