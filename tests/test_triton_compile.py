"""Every Triton kernel of the plugins compiles for sm_90 (H100/H200) on this CPU-only machine, at the tiny and the
12B shapes with the launchers' block sizes and warps (`bench/triton_resources.py`, which also writes the table to
bench/results/triton_sm90.json): shared memory within the 227 KiB a block may use, no register spills in the decode
kernels, libdevice (not approximate) sin/cos for RoPE, and no TF32 tensor-core instructions in the IEEE variants.
The Triton interpreter checks none of this (it accepted a non-constexpr global that GPU compilation rejects)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    import triton_resources as tr

    if not tr._cuobjdump().exists():
        pytest.skip(f"this triton build ships no cuobjdump ({tr._cuobjdump()})")
    out = tmp_path_factory.mktemp("sm90") / "triton_sm90.json"
    # the same entry point as `python bench/triton_resources.py`, in a process of its own: test_triton.py sets
    # TRITON_INTERPRET=1 for the session, and kernels decorated under it are interpreted, not compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_resources.py"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90_within_limits(table):
    import triton_resources as tr

    kernels = table["kernels"]
    assert set(kernels) == {c["name"] for c in tr.cases()}
    names = {"_decode_kernel", "_prefill_attn", "_rope_kv", "_write_full", "_ring_write", "_row_layernorm",
             "_linear", "_position_norms"}
    assert {c["fn"].fn.__name__ for c in tr.cases()} == names  # every kernel of both plugins
    for name, k in kernels.items():
        assert k["shared_bytes"] <= tr.SHARED_LIMIT, f"{name}: {k['shared_bytes']} B shared > 227 KiB"
        assert k["registers"] <= 255, f"{name}: {k['registers']} registers"
        assert not k["approx_sin_cos"], f"{name}: approximate sin/cos in RoPE"
        if "decode" in name:
            assert k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0 and k["local_bytes"] == 0, \
                f"{name}: spills {k['spill_store_bytes']}/{k['spill_load_bytes']} B, local {k['local_bytes']} B"
        if name.endswith("_ieee"):
            assert not k["tf32_mma"], f"{name}: TF32 instructions in the IEEE variant"
    # the TF32 variants do use tensor cores where tl.dot is taken (so the IEEE check above can fail)
    assert kernels["12b_full_decode_tf32"]["tf32_mma"] and kernels["12b_full_prefill_attn_tf32"]["tf32_mma"]


def test_a_module_global_inside_jit_fails_to_compile(tmp_path, monkeypatch):
    """What this file checks catches what the interpreter let through: a plain module global read in a kernel."""
    import importlib.util

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # decorate for compilation, not the interpreter

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path = tmp_path / "global_kernel.py"
    path.write_text("import triton\nimport triton.language as tl\nNEG = -1.0e30\n\n\n"
                    "@triton.jit\ndef k(x):\n    tl.store(x, NEG)\n")
    spec = importlib.util.spec_from_file_location("global_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(Exception, match="NEG"):
        triton.compile(ASTSource(mod.k, signature={"x": "*fp32"}), target=GPUTarget("cuda", 90, 32))
