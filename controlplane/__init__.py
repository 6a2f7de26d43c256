"""The reference control plane: session store, policy, TTL expiry, the gRPC push service
and the HTTP API the ``turnout session`` commands talk to."""
