"""Benchmarks that ship with fastdd (`fastdd bench`): the authors' algorithms restated (`authors`), the sampler
benchmark (`sampler`) and the timing / report helpers the scripts in benchmarks/ share (`common`)."""

from .common import device_name, timeit, write_report

__all__ = ["device_name", "timeit", "write_report"]
