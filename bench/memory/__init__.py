"""Memory benchmark: the whole proxy's RSS after load, beside nginx's (``python -m bench.memory.run``)."""
