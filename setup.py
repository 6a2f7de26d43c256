"""Build hook for the compiled build: ``TURNOUT_MYPYC=1`` compiles the per-request modules.

Everything else about the package is in pyproject.toml. Without the variable this adds
nothing and the package is pure Python (what ``make test`` and CI install). With it,
mypyc (from mypy) turns the modules below into C extensions that Python imports before the
``.py`` files: ``make compile`` builds them in place, deploy/Dockerfile builds the image's
wheel this way. Modules here must be compiled together (a class they subclass must be too).
"""

import os

from setuptools import setup

# The per-request path: both servers, the router, the upstream interface with both clients and
# the pools, mirroring, the HTTP/1.1 codecs' validation and framing, turnout's HTTP/2 engine and
# HPACK, and the routing decision. A class that subclasses a compiled class must be compiled
# too (an interpreted module cannot: tests/unit/test_compiled_boundaries.py checks it).
HOT_MODULES = [
    "dataplane/http1/scan.py", "dataplane/http1/semantics.py", "dataplane/http1/framing.py",
    "dataplane/http1/codec.py", "dataplane/http1/flow.py", "dataplane/http1/server.py", "dataplane/http1/client.py",
    "dataplane/http2/hpack.py", "dataplane/http2/engine.py", "dataplane/http2/link.py",
    "dataplane/http2/server.py", "dataplane/http2/client.py", "dataplane/http2/grpc.py",
    "dataplane/message.py", "dataplane/upstream.py", "dataplane/router.py", "dataplane/mirror.py",
    "dataplane/upstreams.py", "dataplane/pool.py", "dataplane/outlier.py", "dataplane/runtime.py",
    "dataplane/metrics.py", "dataplane/deadline.py",
    "filters/baggage.py", "filters/sources.py", "filters/keys.py", "filters/head.py", "filters/matchers.py",
    "filters/snapshot.py",
]

if os.environ.get("TURNOUT_MYPYC") == "1":
    from mypyc.build import mypycify

    # The shared runtime goes inside a package, so the console script finds it from any directory.
    setup(ext_modules=mypycify(HOT_MODULES, opt_level="3", group_name="turnout.hot"))
else:
    setup()
