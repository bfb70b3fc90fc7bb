"""TensorRT without TensorRT or a GPU: fake engines and contexts that record what `runtime.trt_backend.TrtBackend`
binds, and an engine emulated by ONNX Runtime (it runs the artifact's prefill plugin graph on the host buffers the
backend bound, writing the outputs where they were bound), so the backend's own code runs end to end on the CPU
(torch CPU tensors stand in for device buffers).  Used by tests/test_tensorrt.py and the backend-generic tests."""

from __future__ import annotations

import contextlib

import numpy as np

from runtime.manifest import read_manifest


class _FakeEngine:
    def __init__(self, inputs, outputs, aliases, memory=(1000, 24)):
        self.io = list(inputs) + list(outputs)
        self.inputs, self.aliases = set(inputs), aliases
        self.num_io_tensors = len(self.io)
        self.memory, self.num_optimization_profiles = memory, len(memory)

    def get_tensor_name(self, i):
        return self.io[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.inputs else "out"

    def get_aliased_input_tensor(self, name):
        return self.aliases.get(name)

    def get_device_memory_size_for_profile_v2(self, index):
        return self.memory[index]

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        return _FakeContext()


class _FakeContext:
    def __init__(self):
        self.shapes, self.addresses, self.refuse, self.runs = {}, {}, set(), 0
        self.profile = self.memory = None

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return name not in self.refuse

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return ptr != 0 and name not in self.refuse

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return "profile" not in self.refuse

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def execute_async_v3(self, stream):
        self.runs += 1
        return "execute" not in self.refuse


_FAKE_TRT = type("trt", (), {"TensorIOMode": type("M", (), {"INPUT": "in"}),
                             "ExecutionContextAllocationStrategy": type("S", (), {"USER_MANAGED": "user-managed"}),
                             "DataType": type("D", (), {"FLOAT": "float", "INT64": "int64", "INT32": "int32"})})


def _host_array(ptr: int, shape, dtype) -> np.ndarray:
    """The array at a bound (host) address, as an engine reads and writes it."""
    import ctypes

    shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)


class _EmulatedContext(_FakeContext):
    """Runs the prefill plugin graph with ONNX Runtime on the buffers bound by address, writing the outputs where
    the backend bound them (presents onto the pasts when aliased): what the engine does, minus the GPU."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def execute_async_v3(self, stream):
        self.runs += 1
        sess = self.engine.session
        feeds = {i.name: _host_array(self.addresses[i.name], self.shapes[i.name],
                                     np.int64 if i.type == "tensor(int64)" else np.float32).copy()
                 for i in sess.get_inputs()}
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        for name, value in outs.items():
            np.copyto(_host_array(self.addresses[name], value.shape, value.dtype), value)
        return True


class _EmulatedEngine(_FakeEngine):
    def __init__(self, session, aliases):
        inputs = [i.name for i in session.get_inputs()]
        super().__init__(inputs, [o.name for o in session.get_outputs()], aliases)
        self.session = session

    def get_tensor_dtype(self, name):
        types = {t.name: t.type for t in self.session.get_inputs() + self.session.get_outputs()}
        return {"tensor(float)": "float", "tensor(int64)": "int64"}[types[name]]

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        return _EmulatedContext(self)


def emulated_trt_backend(art, *, prefill_chunk: int = 16):
    """A `TrtBackend` over one engine emulated by ONNX Runtime (two contexts on two profiles, every present
    aliased to its past), as the one-engine TensorRT build makes it; CUDA graphs are stood in for by replaying the
    decode context.  Returns the backend; its ``captures``/``replays`` count the graph captures and replays."""
    import onnxruntime as ort
    import torch

    from runtime.trt_backend import TrtBackend

    manifest = read_manifest(art)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(art / manifest["plugin_graphs"]["prefill"]["file"]), opts,
                                   providers=["CPUExecutionProvider"])
    caches = [i.name for i in session.get_inputs() if i.name.startswith("past_") and i.name != "past_lens"]
    engine = _EmulatedEngine(session, {n.replace("past_", "present_"): n for n in caches})
    manifest["engines"]["tensorrt"] = {"prefill": "m", "decode": "m", "one_engine": True,
                                       "profile_index": {"prefill": 0, "decode": 1}, "prefill_chunk": prefill_chunk}
    b = TrtBackend.__new__(TrtBackend)
    b.torch, b.root, b.manifest, b.device = torch, art, manifest, "cpu"
    b.stream = type("Stream", (), {"cuda_stream": 7, "synchronize": lambda self: None})()
    b.trt, b.engines, b.contexts = _FAKE_TRT, {"prefill": engine, "decode": engine}, {}
    b._on_stream = contextlib.nullcontext
    b._make_contexts({"prefill": 0, "decode": 1})
    b._setup(manifest)
    b.captures, b.replays = [], []

    class Replay:  # a CUDA graph re-runs the captured launches on the buffers bound at capture
        def replay(self):
            b.replays.append(1)
            b._execute("decode")

    b._capture = lambda: b.captures.append(1) or Replay()
    return b


def emulated_trt_assistant(art, backend, prepared):
    """A `runtime.trt_assistant.TrtAssistantRunner` on ``backend`` (`emulated_trt_backend`) over an engine emulated
    by ONNX Runtime running ``prepared`` (the assistant graph as `graphs.trt_assistant.prepare_assistant` made it)
    on the addresses the runner bound; its ``context`` records the shapes and addresses."""
    import onnxruntime as ort

    from runtime.trt_assistant import TrtAssistantRunner

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(prepared), opts, providers=["CPUExecutionProvider"])
    runner = TrtAssistantRunner.__new__(TrtAssistantRunner)
    runner._setup(art, read_manifest(art), backend, _EmulatedEngine(session, {}), _FAKE_TRT)
    return runner
