"""Benchmarks: each module is a script (``python benchmarks/<name>.py --help``).

A package too, so the tests import the pieces they check (``from benchmarks import
step_time``) instead of loading files by path.
"""
