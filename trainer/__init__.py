"""discount-train: purchase history in, versioned ONNX models out (recommendations and discount
response), with the market simulator, policy evaluation and replay that measure them."""
