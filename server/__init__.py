"""discountd: the gRPC server. Serving needs ONNX Runtime, numpy, grpcio and SQLAlchemy, never
torch."""

import os

# gRPC's C core writes plain-text lines to stderr, at INFO one per failed TLS handshake, which
# anyone who reaches the port can cause: they would break the JSON log (docs/SERVING.md). Read
# once, when grpc is first imported, so it is set here, before any server module imports it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
