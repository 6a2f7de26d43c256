"""HTTP/2 (h2c) load benchmark: turnout vs nginx vs HAProxy (``python -m bench.http2.run``)."""
