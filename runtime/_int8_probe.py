"""Whether ONNX Runtime's 8-bit ``MatMulNBits`` is exact on this CPU: the probe `runtime.ort_backend` (refusing an
INT8 engine built for it where it saturates) and `graphs.ort.qdq` (choosing the INT8 kernel at build) share.
Torch-free."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

__all__ = ["cpu_has_vnni", "int8_dot_products_exact"]


def cpu_has_vnni() -> bool:
    """x86 with AVX-VNNI or AVX512-VNNI (int8 dot products accumulated in 32 bits), from /proc/cpuinfo."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni"} & set(flags.split()))


@functools.lru_cache(maxsize=1)
def int8_dot_products_exact() -> bool:
    """Whether ONNX Runtime's 8-bit ``MatMulNBits`` (int8 compute, what build-engine runs INT8 Linears on) is exact on
    this CPU: x86 CPUs without VNNI add pairs of u8 x s8 products in saturating int16 in some int8 kernels, which
    full-range int8 weights and activations overflow.  Not decided from the CPU's flags but measured: the kernel is
    run once per process on worst-case inputs (weights of +-127, activations quantized to +-127, and a random
    full-range pair) and compared with the exact result; a saturating kernel is off by tens of percent there, an
    exact one by float rounding.  (Found exact on AVX-512 VNNI and on AVX2 without VNNI, ONNX Runtime 1.32.)"""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return False
    k, n, block = 256, 8, 128
    rng = np.random.default_rng(0)
    cases = [(np.full((n, k), 127, np.int8), np.ones((1, k), np.float32)),
             (np.full((n, k), -127, np.int8), np.ones((1, k), np.float32)),
             (np.tile(np.array([127, -127], np.int8), (n, k // 2)), np.tile(np.array([-1, 1], np.float32), (1, k // 2))),
             (rng.integers(-127, 128, (n, k)).astype(np.int8), rng.choice([-1.0, 1.0], (2, k)).astype(np.float32))]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for q, x in cases:
        node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                block_size=block, accuracy_level=4)
        graph = helper.make_graph(
            [node], "int8_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block), "B"),
             numpy_helper.from_array(np.full((n, k // block), 1 / 64, np.float32), "S")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        try:
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            got = sess.run(None, {"x": x})[0]
        except Exception:  # noqa: BLE001 - an ONNX Runtime without the kernel: not usable, so not exact
            return False
        want = x.astype(np.float64) @ q.T.astype(np.float64) / 64  # |x| = 1 quantizes to +-127 exactly
        if np.abs(got - want).max() > 1e-5 * max(1.0, np.abs(want).max()):
            return False
    return True
