"""Compile every Triton kernel of the plugins for a GPU target on this (CPU-only) machine and report registers,
spills and shared memory per kernel -> ``bench/results/triton_sm90.json``.

Triton compiles for a target without a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``);
the cubin's resource usage comes from the ``cuobjdump`` that ships with Triton, shared memory from the compiled
kernel's metadata.  Shapes: the tiny test model's and the 12B's layers (sliding: 16 query / 8 KV heads of 256; full:
16 / 1 of 512; PatchEmbed 6912 -> 3840 -> 3840), with the block sizes and warps the launchers use
(`plugins.triton_attention.decode_launch` / `prefill_launch`, `plugins.triton_patch_embed.LINEAR_BLOCKS`), each in
IEEE and TF32 ``tl.dot`` precision where it matters.  ``tests/test_triton_compile.py`` asserts the limits on the same
cases.  Usage: ``python bench/triton_resources.py [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (H100/H200)
TARGET = ("cuda", 90, 32)


def _attention_cases(label: str, text, layer: int) -> list[dict]:
    from plugins import triton_attention as ta

    h, hkv, d = text.num_heads, text.layer_kv_heads(layer), text.layer_head_dim(layer)
    half, g, sliding = d // 2, h // hkv, text.is_sliding(layer)
    kind = "sliding" if sliding else "full"
    f32, i64 = "*fp32", "*i64"
    cases = []
    for precision in ("ieee", "tf32"):
        dec = ta.decode_launch(h, hkv, d)
        cases.append({
            "name": f"{label}_{kind}_decode_{precision}", "fn": ta._decode_kernel, "decode": True,
            "signature": {"q": f32, "k": f32, "v": f32, "kc": f32, "vc": f32, "past_lens": i64, "seq_lens": i64,
                          "inv_freq": f32, "out": f32, "T": "i32", "WINDOW": "i32", "scale": "fp32"},
            "constexprs": {"H": h, "HKV": hkv, "G": g, "HEAD_DIM": d, "HALF": half, "SLIDING": sliding,
                           "BLOCK_T": dec["BLOCK_T"], "USE_DOT": dec["USE_DOT"], "IEEE": precision == "ieee"},
            "num_warps": dec["num_warps"],
        })
        pre = ta.prefill_launch(d)
        cases.append({
            "name": f"{label}_{kind}_prefill_attn_{precision}", "fn": ta._prefill_attn, "decode": False,
            "signature": {"q": f32, "k_new": f32, "v_new": f32, "kc": f32, "vc": f32, "past_lens": i64,
                          "seq_lens": i64, "block": i64, "inv_freq": f32, "out": f32, "S": "i32", "T": "i32",
                          "WINDOW": "i32", "scale": "fp32"},
            "constexprs": {"H": h, "HKV": hkv, "G": g, "HEAD_DIM": d, "HALF": half, "SLIDING": sliding,
                           "BLOCK_M": pre["BLOCK_M"], "BLOCK_N": pre["BLOCK_N"], "USE_DOT": pre["USE_DOT"],
                           "IEEE": precision == "ieee"},
            "num_warps": pre["num_warps"],
        })
    cases.append({
        "name": f"{label}_{kind}_rope_kv", "fn": ta._rope_kv, "decode": False,
        "signature": {"k": f32, "v": f32, "past_lens": i64, "inv_freq": f32, "k_out": f32, "v_out": f32, "S": "i32"},
        "constexprs": {"HKV": hkv, "HEAD_DIM": d, "HALF": half}, "num_warps": 4,
    })
    if sliding:
        cases.append({
            "name": f"{label}_{kind}_ring_write", "fn": ta._ring_write, "decode": False,
            "signature": {"k_new": f32, "v_new": f32, "kc": f32, "vc": f32, "past_lens": i64, "seq_lens": i64,
                          "S": "i32", "T": "i32"},
            "constexprs": {"HKV": hkv, "HEAD_DIM": d}, "num_warps": 4,
        })
    else:
        cases.append({
            "name": f"{label}_{kind}_write_full", "fn": ta._write_full, "decode": False,
            "signature": {"k_new": f32, "v_new": f32, "kc": f32, "vc": f32, "past_lens": i64, "S": "i32", "T": "i32"},
            "constexprs": {"HKV": hkv, "HEAD_DIM": d}, "num_warps": 4,
        })
    return cases


def _patch_embed_cases(label: str, vision, hidden: int) -> list[dict]:
    from plugins import triton_patch_embed as tp

    f32 = "*fp32"
    block = 256
    e = vision.mm_embed_dim
    return [
        {"name": f"{label}_patch_layernorm", "fn": tp._row_layernorm, "decode": False,
         "signature": {"x": f32, "w": f32, "b": f32, "y": f32, "N": "i32", "eps": "fp32"},
         "constexprs": {"BLOCK": block}, "num_warps": 4},
        {"name": f"{label}_patch_linear", "fn": tp._linear, "decode": False,
         "signature": {"a": f32, "w": f32, "bias": f32, "c": f32, "M": "i32", "N": "i32", "K": "i32"},
         "constexprs": {"HAS_BIAS": True, **tp.LINEAR_BLOCKS}, "num_warps": 4},
        {"name": f"{label}_patch_position_norms", "fn": tp._position_norms, "decode": False,
         "signature": {"h": f32, "positions": "*i64", "table": f32, "w2": f32, "b2": f32, "wp": f32, "bp": f32,
                       "y": f32, "E": "i32", "M": "i32", "ln_eps": "fp32", "rms_eps": "fp32"},
         "constexprs": {"BLOCK": min(block, 1 << (e - 1).bit_length())}, "num_warps": 4},
    ]


def cases() -> list[dict]:
    """Every kernel at the tiny test model's and the 12B's shapes."""
    from exporter.config import PRESETS
    from tests.test_plugins import TEXT

    out = []
    for label, text in (("tiny", TEXT), ("12b", PRESETS["gemma4-12b"].text)):
        sliding = next(i for i in range(text.num_layers) if text.is_sliding(i))
        full = next(i for i in range(text.num_layers) if not text.is_sliding(i))
        out += _attention_cases(label, text, sliding) + _attention_cases(label, text, full)
    for label in ("tiny", "12b"):
        cfg = PRESETS["tiny" if label == "tiny" else "gemma4-12b"]
        out += _patch_embed_cases(label, cfg.vision, cfg.text.hidden_size)
    return out


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _ptxas_spills(ptx: str, workdir: Path) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from ``ptxas -v`` on the PTX (the ptxas Triton itself uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    src = workdir / "k.ptx"
    src.write_text(ptx)
    log = subprocess.run([get_ptxas(TARGET[1]).path, f"-arch=sm_{TARGET[1]}a", "-v", str(src), "-o",
                          str(workdir / "k.o")], capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.stdout + log.stderr)
    if m is None:
        raise RuntimeError(f"cannot read ptxas' spill report:\n{log.stdout}{log.stderr}")
    return int(m.group(1)), int(m.group(2))


def compile_case(case: dict) -> dict:
    """Compile for sm_90; registers, spill bytes, local memory, shared memory, and PTX facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(case["signature"])
    sig.update({k: "constexpr" for k in case["constexprs"]})
    src = ASTSource(case["fn"], signature=sig, constexprs=dict(case["constexprs"]))
    kernel = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": case["num_warps"]})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        spill_stores, spill_loads = _ptxas_spills(kernel.asm["ptx"], Path(tmp))
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"{case['name']}: cannot read cuobjdump's resource usage:\n{usage}")
    ptx = kernel.asm["ptx"]
    return {
        "registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "local_bytes": int(m.group(4)),
        "shared_bytes": int(kernel.metadata.shared), "num_warps": case["num_warps"],
        "spill_store_bytes": spill_stores, "spill_load_bytes": spill_loads,
        "approx_sin_cos": bool(re.search(r"\b(sin|cos)\.approx", ptx)),
        "tf32_mma": "tf32" in ptx,
        "constexprs": {k: v for k, v in case["constexprs"].items()},
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "triton_sm90.json"))
    a = p.parse_args()
    import triton

    table = {}
    for case in cases():
        entry = table[case["name"]] = compile_case(case)
        shown = {k: v for k, v in entry.items() if k != "constexprs"}
        print(f"[triton-sm90] {case['name']}: {json.dumps(shown)}", flush=True)
    result = {"target": "sm_90 (cuda, 90, warp 32)", "triton": triton.__version__, "shared_limit_bytes": SHARED_LIMIT,
              "kernels": table}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"[triton-sm90] written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
