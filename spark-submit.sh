#!/usr/bin/env bash
# Run a job of jobs/ with the spark-submit that pyspark ships.
#
#   ./spark-submit.sh [spark-submit options] JOB [job options]
#
# JOB is a name in jobs/ (prepare, pipeline, ...) or a path to a .py file. Options
# before JOB go to spark-submit unchanged (--master, --conf, --driver-memory, ...);
# the master defaults to local[2]. The package travels to executors as a zip
# through --py-files, so executors need not have it installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${ADJOINT_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
if ! command -v java >/dev/null 2>&1 && [[ -z "${JAVA_HOME:-}" ]]; then
  echo "error: Java 17 is required by Spark; install it (apt-get install openjdk-17-jre-headless)." >&2
  exit 1
fi

spark_home="$("$python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"

# Split the arguments: spark-submit options first, then the job and its options.
spark_args=()
user_py_files=""
job=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --py-files) [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
                user_py_files="$2"; shift 2 ;;
    --py-files=*) user_py_files="${1#--py-files=}"; shift ;;
    --*=*) spark_args+=("$1"); shift ;;
    --verbose|-v|--supervise) spark_args+=("$1"); shift ;;
    --*) [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
         spark_args+=("$1" "$2"); shift 2 ;;
    *) job="$1"; shift; break ;;
  esac
done
if [[ -z "$job" ]]; then
  echo "usage: $0 [spark-submit options] JOB [job options]; jobs: $(ls "$here/jobs" | sed -n 's/\.py$//p' | grep -v '^_' | tr '\n' ' ')" >&2
  exit 2
fi
if [[ -f "$job" ]]; then job_file="$job"; else job_file="$here/jobs/$job.py"; fi
[[ -f "$job_file" ]] || { echo "error: no job '$job' (looked for $job_file)" >&2; exit 2; }

has_master=0
for a in "${spark_args[@]+"${spark_args[@]}"}"; do
  [[ "$a" == --master || "$a" == --master=* ]] && has_master=1
done
[[ $has_master -eq 1 ]] || spark_args=(--master "${ADJOINT_MASTER:-local[2]}" "${spark_args[@]+"${spark_args[@]}"}")

# Package the library for the executors.
mkdir -p "$here/build"
zip_file="$here/build/adjoint_spark.zip"
(cd "$here" && "$python" - "$zip_file" <<'PY'
import pathlib, sys, zipfile
out = pathlib.Path(sys.argv[1])
tmp = out.with_suffix(".zip.tmp")
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
    for path in sorted(pathlib.Path("adjoint_spark").rglob("*.py")):
        zf.write(path, path.as_posix())
tmp.replace(out)
PY
)

py_files="$zip_file${user_py_files:+,$user_py_files}"

export SPARK_CONF_DIR="${SPARK_CONF_DIR:-$here/conf/spark}"
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$python}"
export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$python}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$spark_home/bin/spark-submit" --py-files "$py_files" "${spark_args[@]}" "$job_file" "$@"
