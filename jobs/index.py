"""spark-submit entry point: the index stage (see adjoint_spark/index.py)."""

import sys

from adjoint_spark.cli import main
from adjoint_spark.pipeline import run_stages

if __name__ == "__main__":
    sys.exit(main(__doc__, lambda config: run_stages(config, ["index"])))
