"""The gRPC face: a servicer generated from protos/ over the shared engine."""
