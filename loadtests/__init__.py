"""Load tests and the side-by-side benchmark (``python -m loadtests.bench``)."""
