"""ONNX graph rewrites that know no model family: graph surgery for static quantization and NPUs, and the
quantization-time rewrites recipes share (linear layers as Gemm, activation MatMuls, Softmax input ranges)."""
