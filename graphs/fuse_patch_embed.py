"""Rewrite: the whole vision embedder (``model.vision_embedder`` + ``model.embed_vision``) -> one ``gemma4::PatchEmbed``.

Pattern: the prefill graph's nodes exported from those two modules.  Check: the region reads exactly
``image_patches``, ``image_positions`` and the ten weights of the contract (`plugins.patch_embed.WEIGHTS`, matched
by initializer name), plus constants, and produces exactly one value (the soft tokens placed into the sequence);
otherwise it is left alone with the reason.  Rewrite: `graphs.outline.outline`; the weights stay node inputs.
"""

from __future__ import annotations

from graphs.outline import Refused, outline, region, shape_scalar
from plugins import patch_embed as pe

__all__ = ["fuse_patch_embed"]

SCOPES = ("model.vision_embedder", "model.embed_vision")


def fuse_patch_embed(model, vision_cfg, *, log=print) -> dict:
    """Returns ``{"rewritten": 0 or 1, "refused": reason or None}``."""
    if vision_cfg is None:
        return {"rewritten": 0, "refused": None}
    reg = region(model.graph, SCOPES)
    if reg is None:
        return {"rewritten": 0, "refused": "no vision embedder nodes in this graph"}
    try:
        slots, embed, derived_src = {}, [], []
        by_weight = {v: k for k, v in pe.WEIGHTS.items()}
        for v in reg.inputs:
            name = (v.name or "").removeprefix("m.").removeprefix("model.")
            if v.is_graph_input():
                if v.name not in ("image_patches", "image_positions"):
                    raise Refused(f"reads graph input {v.name!r}, which is not part of the contract")
                slots["patches" if v.name == "image_patches" else "positions"] = v
            elif v.is_initializer() and name in by_weight:
                slots[by_weight[name]] = v
            elif v.is_initializer() and v.const_value is not None and v.const_value.size <= 64:
                embed.append(v)
            elif v.producer() is not None and v.producer().op_type == "Constant" and not v.producer().inputs:
                embed.append(v)
            elif shape_scalar(v) is not None:
                derived_src.append(v)
            else:
                raise Refused(f"reads {v.name!r}, which is not part of the contract")
        if missing := [n for n in pe.INPUTS if n not in slots]:
            raise Refused(f"contract inputs not found: {missing}")
        inputs = [slots[n] for n in pe.INPUTS]
        derived = {}
        for v in derived_src:
            source, axis = shape_scalar(v)
            dim = source.shape[axis] if source.shape is not None else None
            hit = [(i, a) for i, c in enumerate(inputs[:2]) if c.shape is not None
                   for a, d in enumerate(c.shape) if dim is not None and not isinstance(d, int) and d == dim]
            if not hit:
                raise Refused(f"reads size {v.name!r}, not a dim of image_patches or image_positions")
            derived[v] = hit[0]
        if len(reg.outputs) != 1:
            raise Refused(f"{len(reg.outputs)} values leave the region; expected only the embeddings")
        outline(model, reg, domain=pe.DOMAIN, op_type=pe.OP, overload="vision", inputs=inputs, outputs=reg.outputs,
                embed=embed, attributes=pe.attributes(vision_cfg), opset=model.opset_imports.get("", 24),
                derived=derived)
    except Refused as e:
        log(f"[plugins] PatchEmbed not applied: {e}")
        return {"rewritten": 0, "refused": str(e)}
    return {"rewritten": 1, "refused": None}
