"""turnout's own fuzzers: targets, their saved corpus, and the runner (``python -m fuzz.run``)."""
