"""gRPC unary benchmark: turnout vs direct (``python -m bench.grpc.run``)."""
