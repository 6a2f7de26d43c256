"""turnout's data plane: the proxy, its configuration and its command line."""
