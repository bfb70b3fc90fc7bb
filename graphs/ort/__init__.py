"""The ONNX Runtime lowering: passes that turn plugin graphs into graphs ONNX Runtime's CPU kernels run fast.

`graphs.ort.lower` is the driver (fixed order, counts returned); each other module is one pass.  `graphs.ort.qdq`
lowers quantized (Q/DQ) Linears.  TensorRT never sees these graphs: its rewrites and build stay in `graphs`.
"""
