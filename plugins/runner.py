"""Execute a plugin graph on the CPU with the plugins' numpy references instead of their function bodies.

``PluginRefRunner`` (a Polygraphy ``BaseRunner``) and `run_with_references` load a plugin graph, drop its
model-local functions (so nothing but the references can compute the plugin nodes) and evaluate it with
``onnx.reference.ReferenceEvaluator``, registering one ``OpRun`` per entry of `plugins.REFERENCES`.  This checks
the contracts end to end: a plugin graph run this way must give the numbers of the exported graph.  Slow (numpy,
op by op): for tiny configs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["PluginRefRunner", "reference_evaluator", "run_with_references"]


def _op_classes():
    from onnx.reference.op_run import OpRun

    from plugins import REFERENCES

    classes = []
    for (domain, op), fn in REFERENCES.items():

        def _run(self, *inputs, _fn=fn, **attrs):
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items() if v is not None}
            out = _fn(*inputs, **attrs)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        classes.append(type(op, (OpRun,), {"op_domain": domain, "_run": _run}))

    def _gather_elements(self, data, indices, axis=0):
        # onnx.reference's GatherElements uses np.choose, limited to axes of at most 64 elements
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, idx, axis=axis),)

    classes.append(type("GatherElements", (OpRun,), {"op_domain": "", "_run": _gather_elements}))
    return classes


def reference_evaluator(path: str | Path):
    """A ``ReferenceEvaluator`` of the plugin graph at ``path`` (weights loaded) with the numpy references."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(path), load_external_data=True)
    del proto.functions[:]
    for node in proto.graph.node:
        node.overload = ""
    return ReferenceEvaluator(proto, new_ops=_op_classes())


def run_with_references(path: str | Path, feeds: dict) -> dict:
    ev = reference_evaluator(path)
    names = [o.name for o in ev.proto_.graph.output]
    return dict(zip(names, ev.run(None, feeds)))


def _lazy_base():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


class PluginRefRunner(_lazy_base()):
    """Polygraphy runner over `reference_evaluator`, for ``Comparator.run`` against ONNX Runtime."""

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(name=name, prefix="plugin-ref-runner")
        self.path = Path(path)

    def activate_impl(self):
        self.ev = reference_evaluator(self.path)

    def deactivate_impl(self):
        del self.ev

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata
        import onnx

        meta = TensorMetadata()
        for i in self.ev.proto_.graph.input:
            dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            meta.add(i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type), dims)
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        names = [o.name for o in self.ev.proto_.graph.output]
        out = dict(zip(names, self.ev.run(None, dict(feed_dict))))
        self.inference_time = time.perf_counter() - start
        return out
