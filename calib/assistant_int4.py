"""INT4 weights for the drafting assistant's graph: `exporter.export_assistant` with every Linear rewritten.

Every Linear with a constant weight (pre/post projections, q/o projections, the MLPs, the plain LM head) becomes a
block-wise INT4 round-to-nearest ``DequantizeLinear -> MatMul`` (`calib.int4.quantize_graph_int4`, the target's
INT4 form; ONNX Runtime fuses each into ``MatMulNBits``).  No calibration data: AWQ's activation-aware factors
would need the assistant's activation statistics (`calib.assistant_int8.collect_assistant_stats` collects them for
INT8 but keeps no sample rows, which AWQ's search needs).

    python -m calib.assistant_int4 --assistant <checkpoint dir> --artifact <artifact> [--block-size 32]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from exporter.export_assistant import export_assistant
from runtime.staging import error_message

__all__ = ["quantize_int4"]


def quantize_int4(path: Path, block_size: int) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place (its external data file replaced); returns the counts."""
    import onnx_ir as ir

    from calib.int4 import quantize_graph_int4
    from exporter.linears import find_linears

    model = ir.load(str(path))
    linears = find_linears(model)
    counts = quantize_graph_int4(model, linears, sorted(linears), block_size)
    tmp, data = path.with_name("int4-" + path.name), f"{path.name}.int4.data"  # not the file being read
    ir.save(model, str(tmp), external_data=data)
    del model
    for f in path.parent.iterdir():
        if f.name not in (tmp.name, data):
            f.unlink()  # the fp32 graph and its data
    tmp.replace(path)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.assistant_int4", description=__doc__.split("\n")[0])
    p.add_argument("--assistant", required=True, help="assistant checkpoint directory (transformers' format)")
    p.add_argument("--artifact", required=True, help="the target's artifact directory")
    p.add_argument("--block-size", type=int, default=32, choices=(16, 32, 64, 128),
                   help="input channels per INT4 scale")
    a = p.parse_args(argv)
    try:
        export_assistant(a.assistant, a.artifact, rewrite=functools.partial(quantize_int4, block_size=a.block_size),
                         precision=f"int4 (block {a.block_size}, round-to-nearest)")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"assistant-int4: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
