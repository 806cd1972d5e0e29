"""adjoint-spark: two-tower retrieval trained and served as a Spark job."""

from setuptools import find_packages, setup

# The pins are one set checked to work together: Petastorm 0.12 needs pyarrow < 15 and
# NumPy < 2, and Spark 4.0.x is the newest Spark whose pandas UDFs accept pyarrow 14.
# torch is pinned to the CPU build that pip finds on this machine's disk; a GPU host
# installs its CUDA build of the same version instead.
INSTALL_REQUIRES = [
    "pyspark==4.0.5",
    "pyarrow==14.0.2",
    "numpy==1.26.4",
    "pandas==2.2.3",
    "petastorm==0.12.1",
    "faiss-cpu==1.15.1",
    "torch==2.13.0",
    "pyyaml==6.0.3",
    "matplotlib==3.11.2",
    "psutil==7.2.2",
]

EXTRAS_REQUIRE = {
    "test": ["pytest==9.2.0", "hypothesis==6.170.17", "ruff==0.17.6"],
}

setup(
    name="adjoint-spark",
    version="0.1.0",
    description="Two-tower vector retrieval as a Spark job: prepare, train, index, retrieve.",
    packages=find_packages(include=["adjoint_spark", "adjoint_spark.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
