"""cryodask's benchmark suite: timings as ratios to a floor measured in the same run."""
