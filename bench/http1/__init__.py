"""HTTP/1.1 load benchmark: turnout vs nginx vs HAProxy (``python -m bench.http1.run``)."""
