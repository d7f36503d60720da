"""kvstore.ingest: bulk loaders (Arrow/Parquet → SST → ingest → swap) and stream consumers.

Installed as ``kvstore.ingest`` (a setuptools package-dir mapping); nothing here yet
beyond the package itself: bulk loads and stream consumers are their own issues.
"""
