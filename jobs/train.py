"""spark-submit entry point: train the two towers on the prepared data."""

import sys

from adjoint_spark.cli import main
from adjoint_spark.pipeline import run_stages

if __name__ == "__main__":
    sys.exit(main(__doc__, lambda config: run_stages(config, ["train"])))
