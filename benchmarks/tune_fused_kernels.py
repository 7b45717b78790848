#!/usr/bin/env python
"""Launch settings of the fused CompoDiff inference kernels at full size (CUDA): time per call for each setting.

    python benchmarks/tune_fused_kernels.py --batch 1024

Prints a table and writes JSON; the settings in use are `fused_inference.CROSS_ATTENTION_LAUNCH` and
`fused_inference.SELF_ATTENTION_WARPS`. The bytes each call must read give its memory-bandwidth floor.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch

from diffusers_cir.models import fused_inference as fa


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--text_length", type=int, default=77)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--groups", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--shared_warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "fused_kernels.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    from triton.testing import do_bench

    device, dtype, heads, head_dim, width = "cuda", torch.bfloat16, 8, 64, 768
    batch, length = args.batch, args.text_length
    query = torch.randn(3 * batch, 2, heads * head_dim, device=device, dtype=dtype)
    conditional = torch.randn(batch, length + 2, 2 * heads * head_dim, device=device, dtype=dtype)
    negative = torch.randn(1, length, 2 * heads * head_dim, device=device, dtype=dtype)
    null = torch.randn(2, head_dim, device=device, dtype=dtype)
    floor_bytes = conditional.numel() * 2 + query.numel() * 2 * 2
    rows = []
    default = dict(fa.CROSS_ATTENTION_LAUNCH)
    for chunk, warps in itertools.product(args.chunks, args.warps):
        # every row by the per-row kernel (shared_group=0), as for per-query negative texts
        fa.CROSS_ATTENTION_LAUNCH.update(chunk=chunk, num_warps=warps, shared_group=0)
        try:
            ms = do_bench(lambda: fa.guidance_cross_attention(query, conditional, negative, null, heads), rep=50)
        except Exception as error:  # a setting the compiler refuses (registers, shared memory)
            print(f"cross chunk={chunk} warps={warps}: {type(error).__name__}")
            continue
        rows.append({"kernel": "cross", "chunk": chunk, "num_warps": warps,
                     "us": round(ms * 1000, 1), "floor_us": round(floor_bytes / 3.0e12 * 1e6, 1)})
        print(rows[-1])
    fa.CROSS_ATTENTION_LAUNCH.update(default)
    # the shared-negative kernel (the default call path when one negative text serves the batch)
    for group, warps in itertools.product(args.groups, args.shared_warps):
        fa.CROSS_ATTENTION_LAUNCH.update(shared_group=group, shared_warps=warps)
        try:
            ms = do_bench(lambda: fa.guidance_cross_attention(query, conditional, negative, null, heads), rep=50)
        except Exception as error:
            print(f"cross+shared group={group} warps={warps}: {type(error).__name__}")
            continue
        rows.append({"kernel": "cross+shared", "group": group, "shared_warps": warps, "us": round(ms * 1000, 1),
                     "floor_us": round(floor_bytes / 3.0e12 * 1e6, 1)})
        print(rows[-1])
    fa.CROSS_ATTENTION_LAUNCH.update(default)
    q = torch.randn(3 * batch, 2, 16 * head_dim, device=device, dtype=dtype)
    kv = torch.randn(3 * batch, 2, 2 * head_dim, device=device, dtype=dtype)
    tables = (torch.ones(2, head_dim, device=device), torch.zeros(2, head_dim, device=device),
              torch.zeros(16, 2, 3, device=device))
    default_warps = fa.SELF_ATTENTION_WARPS
    for warps in args.warps:
        fa.SELF_ATTENTION_WARPS = warps
        ms = do_bench(lambda: fa.multi_query_self_attention(q, kv, null, *tables, 16.0), rep=50)
        rows.append({"kernel": "self", "num_warps": warps, "us": round(ms * 1000, 1),
                     "floor_us": round(q.numel() * 2 * 2 / 3.0e12 * 1e6, 1)})
        print(rows[-1])
    fa.SELF_ATTENTION_WARPS = default_warps
    hidden = torch.randn(3 * batch * 2, 2 * 3072, device=device, dtype=dtype)
    ms = do_bench(lambda: fa.swiglu(hidden), rep=50)
    rows.append({"kernel": "swiglu", "us": round(ms * 1000, 1), "floor_us": round(hidden.numel() * 3 / 3.0e12 * 1e6, 1)})
    update = torch.randn(3 * batch * 2, width, device=device, dtype=dtype)
    gain = torch.ones(width, device=device, dtype=dtype)
    ms = do_bench(lambda: fa.residual_norm(update, update, gain, gain, 1e-3, 1e-3), rep=50)
    rows.append({"kernel": "residual_norm", "us": round(ms * 1000, 1), "floor_us": round(update.numel() * 8 / 3.0e12 * 1e6, 1)})
    print(rows[-2], rows[-1], sep="\n")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "batch": batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
