"""discountd: the gRPC server. Serving needs ONNX Runtime, numpy and grpcio, never torch."""
