"""Benchmarks of cblr_ext: ``python -m bench`` (report) and pytest-benchmark
microbenchmarks under ``bench/benchmarks``.  See bench/README.md."""
