"""fxmerge's benchmarks, run from the repository root as ``python -m benchmarks.NAME``
(``make bench``, ``make perf``, ...); ``common`` holds what they share."""
