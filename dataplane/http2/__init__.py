"""HTTP/2 and gRPC: the downstream connection manager, the multiplexed upstream pool and
the listener's protocol sniffer, all on the sans-IO h2 library."""
