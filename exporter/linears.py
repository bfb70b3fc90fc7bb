"""Find the Linear layers of an exported graph: which node, which activation, which weight, which module.

torch.onnx exports ``nn.Linear`` as ``MatMul(x, Transpose(W))`` (unoptimised graphs), ``MatMul(x, W_t)`` (after
constant folding, where the initializer loses its module name) or ``Gemm(x, W, b, transB=1)``.  Every node keeps
the module path in its ``pkg.torch.onnx.name_scopes`` metadata, so sites are named by module whatever form the graph
has: ``model.language_model.layers.3.mlp.down_proj``.  The tied LM head (``matmul(h, embed_tokens.weight.t())``)
is named ``lm_head``.  Used by the precision cast (`exporter.cast_precision`) and by calibration (statistics,
SmoothQuant and Q/DQ insertion in `calib`); it only reads the graph.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = ["LM_HEAD", "Linear", "find_linears", "group_of", "layer_index", "trace_back", "drop_unused_weights"]

LM_HEAD = "lm_head"
_PREFIX = "m."  # the export wrappers hold the model as attribute ``m``
_PASS_THROUGH = ("Cast", "CastLike", "Identity")


@dataclass
class Linear:
    module: str  # "model.language_model.layers.0.self_attn.q_proj" or "lm_head"
    node: object  # onnx_ir.Node: MatMul or Gemm
    activation: object  # onnx_ir.Value: input 0
    weight: object  # onnx_ir.Value: the initializer holding the weight
    out_in: bool  # True: the initializer is (out, in) (nn.Linear layout); False: (in, out)
    transpose: object | None = None  # the Transpose node between the initializer and the MatMul, if any

    def weight_out_in(self):
        """The weight as a (out, in) float32 numpy array (reads the initializer)."""
        import numpy as np

        w = np.asarray(self.weight.const_value.numpy(), dtype=np.float32)
        return w if self.out_in else w.T


def _module_of(node) -> str | None:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    mods = [n for n in names[:-1] if n]
    if not mods:
        return None
    mod = mods[-1]
    return mod[len(_PREFIX):] if mod.startswith(_PREFIX) else mod


def _initializer(value):
    """``value`` if it is an initializer with data, else None."""
    if value is not None and value.is_initializer() and value.const_value is not None:
        return value
    return None


def _weight_of(node):
    """(initializer, out_in, transpose node) for a MatMul/Gemm whose second input is a constant weight."""
    b = node.inputs[1]
    if node.op_type == "Gemm":
        if _initializer(b) is None or node.attributes.get_int("transA", 0):
            return None
        return b, bool(node.attributes.get_int("transB", 0)), None
    if _initializer(b) is not None and len(b.shape or ()) == 2:
        return b, False, None
    prod = b.producer() if b is not None else None
    if prod is not None and prod.op_type == "Transpose" and _initializer(prod.inputs[0]) is not None:
        perm = prod.attributes.get_ints("perm", None)
        if len(prod.inputs[0].shape or ()) == 2 and (perm is None or list(perm) == [1, 0]):
            return prod.inputs[0], True, prod
    return None


def find_linears(model) -> dict[str, Linear]:
    """Module name -> `Linear` for every MatMul/Gemm of ``model`` (onnx_ir) that multiplies by a constant weight."""
    found: dict[str, Linear] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        w = _weight_of(node)
        if w is None:
            continue
        weight, out_in, transpose = w
        if weight.name.removeprefix(_PREFIX).endswith("embed_tokens.weight"):
            module = LM_HEAD
        else:
            module = _module_of(node)
        if module is None:
            raise ValueError(
                f"{model.graph.name}: MatMul {node.name!r} has a constant weight but no module path in its "
                "metadata (pkg.torch.onnx.name_scopes); was the graph exported by `make export`?"
            )
        if module in found:
            raise ValueError(f"{model.graph.name}: module {module} appears in two MatMul nodes")
        found[module] = Linear(module, node, node.inputs[0], weight, out_in, transpose)
    return found


def layer_index(module: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def group_of(module: str) -> str:
    """Which part of the model a Linear belongs to: decoder, lm_head, vision or audio."""
    if module == LM_HEAD:
        return "lm_head"
    if "embed_vision" in module or "vision_embedder" in module:
        return "vision"
    if "embed_audio" in module:
        return "audio"
    return "decoder"


def trace_back(value):
    """Follow ``value`` back through Cast/CastLike/Identity; returns (value, chain of values passed)."""
    chain = [value]
    while (p := value.producer()) is not None and p.op_type in _PASS_THROUGH:
        value = p.inputs[0]
        chain.append(value)
    return value, chain


def drop_unused_weights(graph) -> None:
    """Remove the Transposes and initializers a weight rewrite left without users (the old fp32 weights)."""
    for node in list(graph):
        if node.op_type == "Transpose" and all(not o.uses() for o in node.outputs) and not any(
            o in graph.outputs for o in node.outputs
        ):
            graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in graph.inputs and value not in graph.outputs:
            graph.initializers.pop(name)
