"""spark-submit entry point: run every stage of the pipeline on one data set."""

import sys

from adjoint_spark.cli import main
from adjoint_spark.pipeline import STAGES, run_stages

if __name__ == "__main__":
    sys.exit(main(__doc__, lambda config: run_stages(config, list(STAGES))))
