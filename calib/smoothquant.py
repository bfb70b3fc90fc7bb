"""SmoothQuant: move activation outliers into the weights with an exact per-channel rescaling.

For Linears that share an input X, per input channel j: ``s_j = max|X_j|^alpha / max|W_{:,j}|^(1-alpha)`` (alpha 0.5
by default, the value reported to work for Gemma).  Then X/s feeds W*s: the product is unchanged, X/s has smaller
outliers and W*s absorbs them, where per-channel weight scales cope.  The division is folded into whatever made X:

* an RMSNorm (``input_layernorm`` -> q/k/v, ``pre_feedforward_layernorm`` -> gate/up): Gemma 4's norm multiplies by
  its weight directly, so the weight is divided by s;
* an elementwise product with a Linear's output (``gelu(gate) * up`` -> down): up_proj's output rows are divided.

Other Linears (o_proj, whose input comes from attention over a weightless-normed V; the vision and audio
projections after weightless norms; the LM head, whose weight is the embedding's: a Linear whose weight initializer
has other users is never folded into) are left as they are, with the reason recorded.  Every fold is checked on
the graph first (the values on the way have no other users, the norm weight feeds only this norm); a graph that does not look as expected is refused for that group, not mis-rewritten.
Folds edit initializers lazily (`onnx_ir.LazyTensor`): a weight is read and scaled only when the graph is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exporter.linears import Linear, trace_back

__all__ = ["SmoothGroup", "SmoothPlan", "apply_smoothing", "plan_smoothing", "smoothing_factors"]


@dataclass
class SmoothGroup:
    modules: list[str]  # Linears sharing one input
    kind: str  # "norm" or "linear"
    source: str  # the norm weight's module path, or the Linear whose output rows absorb 1/s
    factors: np.ndarray  # (in_features,) s


@dataclass
class SmoothPlan:
    alpha: float
    groups: list[SmoothGroup] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it was not smoothed

    def factor_of(self, module: str) -> np.ndarray | None:
        for g in self.groups:
            if module in g.modules:
                return g.factors
        return None


def _only_users(value, allowed) -> bool:
    return all(use.node in allowed for use in value.uses())


def _fold_target(lin_group: list[Linear], linears: dict[str, Linear]):
    """("norm", initializer value, module path) or ("linear", Linear, module) that can absorb 1/s, or a reason."""
    a = lin_group[0].activation
    nodes = {lin.node for lin in lin_group}
    for lin in lin_group:
        mine = {lin.node} | ({lin.transpose} if lin.transpose is not None else set())
        if not _only_users(lin.weight, mine):  # the tied LM head: scaling it would rescale the embedding too
            return f"its weight {lin.weight.name} has other users (tied)"
    if not _only_users(a, nodes):
        return f"its input {a.name} has users besides the Linears"
    src, chain = trace_back(a)
    for prev, nxt in zip(chain[1:], chain[:-1]):
        if len(prev.uses()) != 1:
            return f"{prev.name} has other users"
    mul = src.producer()
    if mul is None or mul.op_type != "Mul":
        made_by = "a graph input" if mul is None else f"a {mul.op_type} node"
        return f"its input comes from {made_by}, not from a weighted RMSNorm or a product with a Linear's output"
    channels = a.shape[-1] if a.shape is not None else None
    for x in mul.inputs:
        base, wchain = trace_back(x)
        if base.is_initializer() and base.shape is not None and list(base.shape) == [channels]:
            if any(len(v.uses()) != 1 for v in wchain):
                return f"norm weight {base.name} has other users"
            return "norm", base, base.name.removeprefix("m.").removesuffix(".weight")
    for x in mul.inputs:
        base, chain2 = trace_back(x)
        prod = base.producer()
        if prod is None:
            continue
        up = next((lin for lin in linears.values() if lin.node is prod), None)
        if up is not None and all(len(v.uses()) == 1 for v in chain2) and len(base.uses()) == 1:
            if up.node.op_type == "Gemm" and len(up.node.inputs) > 2 and up.node.inputs[2] is not None:
                return f"{up.module} has a bias"
            return "linear", up, up.module
    return "its input is neither a weighted RMSNorm nor a product with a Linear's output"


def smoothing_factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """Per input channel ``s = max|X|^alpha / max|W|^(1-alpha)`` (channels of a Linear group's shared input; ``w_max``
    over all the group's weights); channels with no activation or no weight keep 1."""
    x_max, w_max = np.asarray(x_max, np.float64), np.asarray(w_max, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def plan_smoothing(linears: dict[str, Linear], stats, modules: list[str], alpha: float = 0.5) -> SmoothPlan:
    """Smoothing factors for the groups of ``modules`` (the Linears to quantize) that can absorb them."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha={alpha}; expected a value in [0, 1]")
    plan = SmoothPlan(alpha)
    by_input: dict[str, list[Linear]] = {}
    for m in modules:
        by_input.setdefault(linears[m].activation.name, []).append(linears[m])
    for group in by_input.values():
        names = [lin.module for lin in group]
        target = _fold_target(group, linears)
        if isinstance(target, str):
            plan.skipped.update({n: target for n in names})
            continue
        if names[0] not in stats.tensors:
            plan.skipped.update({n: "no statistics (it never ran on the calibration data)" for n in names})
            continue
        w_max = np.max([np.abs(lin.weight_out_in()).max(axis=0) for lin in group], axis=0)
        s = smoothing_factors(stats.tensors[names[0]].absmax, w_max, alpha)
        kind, _, source = target
        plan.groups.append(SmoothGroup(names, kind, source, s))
    return plan


def _lazy(value, fn) -> None:
    """Replace an initializer's data by ``fn(old numpy array)``, computed when the graph is saved."""
    import onnx_ir as ir

    old = value.const_value
    value.const_value = ir.LazyTensor(
        lambda: ir.tensor(fn(np.asarray(old.numpy(), dtype=np.float32)).astype(np.float32)),
        dtype=ir.DataType.FLOAT, shape=old.shape, name=value.name,
    )


def apply_smoothing(linears: dict[str, Linear], plan: SmoothPlan) -> dict[str, int]:
    """Fold ``plan`` into one graph's initializers (the graph's own `find_linears` result).  Returns counts."""
    done = {"groups": 0, "norms": 0, "linears": 0}
    for g in plan.groups:
        present = [m for m in g.modules if m in linears]
        if not present:
            continue
        target = _fold_target([linears[m] for m in present], linears)
        if isinstance(target, str):
            raise ValueError(f"SmoothQuant group {g.modules}: cannot fold into this graph: {target}")
        kind, where, _ = target
        s = g.factors
        for m in present:
            lin = linears[m]
            # input channel j of the weight: column j of (out, in), row j of (in, out)
            _lazy(lin.weight, (lambda w, s=s: w * s[None, :]) if lin.out_in else (lambda w, s=s: w * s[:, None]))
            done["linears"] += 1
        if kind == "norm":
            _lazy(where, lambda w, s=s: w / s)
            done["norms"] += 1
        else:  # the producing Linear's output channel j
            _lazy(where.weight, (lambda w, s=s: w / s[:, None]) if where.out_in else (lambda w, s=s: w / s[None, :]))
        done["groups"] += 1
    return done
