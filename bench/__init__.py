"""fastloss benchmarks.

* ``python -m bench``: the harness (losses x providers x shapes; timing, floor, memory, accuracy).
* ``python -m bench.train``: a small language model trained with torch's and fastloss's cross-entropy.
* ``pytest bench --benchmark-only``: a pytest-benchmark suite (kept out of the default test run).

See ``bench/NOTES.md`` for the method.
"""
