"""Config-channel benchmarks."""
