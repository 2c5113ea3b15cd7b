"""llavakit benchmarks: each measure beside its baseline in the same run, reported as a ratio."""
