"""The device's own matmul peak at a model's shapes: what model FLOP utilization (MFU) divides by.

The rate of ``x·Wᵀ`` for every distinct projection shape of the model (``q/k/v/o``, ``gate/up``,
``down`` of each layer's widths), ``x`` holding one micro-batch's tokens, in the dtype the training
matmuls run in (``bfloat16`` under ``bf16-mixed``), run back to back as one pass; the median over
``--repeats`` of total FLOPs / seconds (``lit_recover.models.flops.matmul_peak_flops``). A vendor's
datasheet peak is a bound no kernel reaches; this is what the device gives on this work.

Usage, from the repository root::

    python -m benchmarks.matmul_peak --model results/x/pruned_model --tokens 1024 --dtype bfloat16
    python -m benchmarks.matmul_peak --hidden-size 4096 --layers layers.json --device cuda --out peak.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.report import write_result


def model_shapes(path: str) -> tuple[list[dict[str, int]], int]:
    """``(layer shapes, hidden size)`` of a pruned folder (read from its shape map, no weights), an HF
    folder's config, or any model ``load_pruned`` reads."""
    folder = Path(path)
    shapes_file = folder / "layer_shapes.json"
    if shapes_file.is_file():
        layers = json.loads(shapes_file.read_text())["layers"]
        hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
        return layers, int(hidden)
    from lit_recover.models.anatomy import layer_shapes
    from lit_recover.models.load import load_pruned

    model, _ = load_pruned(path, check=False)
    return layer_shapes(model), int(model.config.hidden_size)


def measure(layers: list[dict[str, int]], hidden_size: int, tokens: int, dtype: str = "bfloat16",
            device: str = "cpu", repeats: int = 7, min_seconds: float = 0.2,
            max_layers: int | None = None) -> dict[str, Any]:
    """``matmul_peak_flops`` at the model's projection shapes; the result with the shapes' source."""
    import torch

    from lit_recover.models.flops import matmul_peak_flops, matmul_shapes

    shapes = matmul_shapes(layers, hidden_size, max_layers=max_layers)
    result = matmul_peak_flops(shapes, tokens, getattr(torch, dtype), device, repeats=repeats,
                               min_seconds=min_seconds)
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="pruned folder / pickle / HF folder whose shapes to use")
    p.add_argument("--layers", type=Path, help="JSON list of layer_shapes entries (instead of --model)")
    p.add_argument("--hidden-size", type=int, help="model width (with --layers)")
    p.add_argument("--tokens", type=int, default=1024, help="rows of x: tokens per micro-batch (default 1024)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32 (default bfloat16)")
    p.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-seconds", type=float, default=0.2, help="minimum seconds per repeat")
    p.add_argument("--max-layers", type=int, default=None,
                   help="use the shapes of this many layers spread over the model (default: all)")
    p.add_argument("--out", type=Path, help="write the result JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.model:
        layers, hidden = model_shapes(args.model)
    elif args.layers and args.hidden_size:
        layers, hidden = json.loads(args.layers.read_text()), args.hidden_size
    else:
        raise SystemExit("error: give --model, or --layers and --hidden-size")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = measure(layers, hidden, args.tokens, args.dtype, device, args.repeats, args.min_seconds, args.max_layers)
    print(f"{result['gflops_per_s']:.1f} GFLOP/s ({result['dtype']}, {result['device']}, {args.tokens} tokens, "
          f"{len(result['shapes'])} shapes, median of {len(result['repeats'])})")
    if args.out:
        write_result(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
