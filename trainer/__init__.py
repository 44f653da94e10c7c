"""discount-train: purchase history in, a versioned ONNX model artifact out."""
