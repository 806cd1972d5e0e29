"""Shared command-line handling for the jobs in ``jobs/``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from adjoint_spark.config import Config, ConfigError, load_config
from adjoint_spark.readers import PrepareError
from adjoint_spark.session import setup_logging
from adjoint_spark.storage import ArtifactError

logger = logging.getLogger(__name__)

# Errors a user can act on: printed as one line, exit status 2, no traceback.
USER_ERRORS = (ConfigError, PrepareError, ArtifactError, FileNotFoundError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file (see conf/)")
    p.add_argument("--output", help="output folder or URI; overrides the config's 'output'")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set prepare.num_partitions=8 (repeatable)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output={args.output}")
    return load_config(args.config, overrides)


def main(
    description: str, run: Callable[[Config], int | None], argv: list[str] | None = None
) -> int:
    """Parse arguments, load the config and call ``run``; user errors exit with 2."""
    args = parser(description).parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = config_from_args(args)
        return run(config) or 0
    except USER_ERRORS as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
