"""adjoint-spark: two-tower vector retrieval trained and served as a Spark job."""

__version__ = "0.1.0"
