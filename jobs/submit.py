"""``maskray submit | status | logs | stop``: maskray jobs on a running Ray cluster.

``maskray submit [--address URL] [--wait] -- train|infer|distill|convert|pack ARGS...`` runs on
the cluster the command a user runs locally (``python -m <its jobs module> ARGS``, the module from
:data:`jobs.cli.COMMANDS`). Staging, runtime env, token auth and log following are
:mod:`pipeline.cluster`; this module parses, calls it and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import cli
from pipeline import cluster

logger = logging.getLogger(__name__)

# The maskray commands that run as cluster jobs (their modules: cli.COMMANDS).
CLUSTER_COMMANDS: tuple[str, ...] = ("train", "infer", "distill", "convert", "pack")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, metavar="URL",
                        help=f"Ray dashboard URL of the cluster (default: $RAY_ADDRESS, else {cluster.DEFAULT_ADDRESS})")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--wait", action="store_true",
                        help="follow the job's logs until it ends; exit non-zero unless it SUCCEEDED")
    parser.add_argument("--runtime-env", default=str(cluster.RUNTIME_ENV_FILE), metavar="YAML",
                        help="runtime env merged with the project working_dir (default: infra/runtime_env.yaml)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra (non-secret) env var for the job; repeatable")
    parser.add_argument("--submission-id", default=None, help="submission id to use (default: Ray generates one)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None, metavar="N",
                        help="CPUs reserved for the entry point process (the driver)")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None, metavar="N",
                        help="GPUs reserved for the entry point process (the driver)")
    parser.add_argument("job", choices=CLUSTER_COMMANDS, help="the maskray command to run on the cluster")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="its arguments, as for the local command (put `--` before the command)")


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("submission_id", nargs="?", default=None, metavar="ID",
                        help="submission id (default: list all jobs of the cluster)")


def add_logs_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the job ends")
    parser.add_argument("submission_id", metavar="ID", help="submission id")


def add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    parser.add_argument("submission_id", metavar="ID", help="submission id")


def job_request(args: argparse.Namespace) -> cluster.JobRequest:
    """The submission the parsed ``maskray submit`` arguments describe."""
    return cluster.JobRequest(
        command=args.job, module=cli.COMMANDS[args.job][0], args=tuple(args.job_args),
        runtime_env_file=args.runtime_env, env=tuple(args.env), submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus)


def run_submit(args: argparse.Namespace) -> int:
    request = job_request(args)
    for path in cluster.paths_outside_project(request.args):
        logger.warning("%s is outside the project folder: the job reads it on the cluster, which works only "
                       "where the nodes share this filesystem (use s3:// or a path inside the project)", path)
    client = cluster.connect(args.address)
    submission_id = cluster.submit(client, request)
    print(f"submission id: {submission_id}")
    print(f"dashboard:     {cluster.dashboard_url(client, submission_id)}")
    sys.stdout.flush()
    if not args.wait:
        print(f"follow with:   maskray logs --follow {submission_id} --address {client.get_address()}", file=sys.stderr)
        return 0
    try:
        status = cluster.follow_logs(client, submission_id)
    except KeyboardInterrupt:
        print(f"\nmaskray submit: stopped following; job {submission_id} goes on "
              f"(maskray stop {submission_id} to end it)", file=sys.stderr)
        raise
    if status == "SUCCEEDED":
        print(f"job {submission_id} SUCCEEDED", file=sys.stderr)
        return 0
    print(f"maskray submit: error: job {submission_id} {status}: {cluster.failure_reason(client, submission_id)}",
          file=sys.stderr)
    return 1


def run_status(args: argparse.Namespace) -> int:
    client = cluster.connect(args.address)
    if args.submission_id is None:
        jobs = cluster.list_jobs(client)
        for job in jobs:
            print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
        if not jobs:
            print("no jobs", file=sys.stderr)
        return 0
    job = cluster.job_state(client, args.submission_id)
    print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
    if job.message:
        print(job.message)
    return 0


def run_logs(args: argparse.Namespace) -> int:
    client = cluster.connect(args.address)
    if args.follow:
        cluster.job_state(client, args.submission_id)  # an unknown id: one clear line
        cluster.follow_logs(client, args.submission_id)
    else:
        sys.stdout.write(cluster.job_logs(client, args.submission_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    client = cluster.connect(args.address)
    requested, status = cluster.stop(client, args.submission_id, wait=args.wait)
    if not requested:
        print(f"job {args.submission_id} already {status}")
    elif args.wait:
        print(f"job {args.submission_id} {status}")
    else:
        print(f"stop requested for job {args.submission_id}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("submit"))
