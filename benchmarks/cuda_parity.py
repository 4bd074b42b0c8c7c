"""Parity on a GPU: the layer report of the fast variants in float32, float16 and bfloat16.

Run on a machine with CUDA (nothing in CI depends on it):

    python benchmarks/cuda_parity.py                       # the layer report, on cuda
    TORCH_DEVICE=cuda python -m pytest -p no:xdist tests/test_parity.py -k "tiny or deit3_small"

For each fast variant (seeded random weights) and dtype, the timm model computes in float32 and
the converted transformers model (sdpa attention) in the dtype, both on `--device`; every stage
is compared (`check_parity(..., layers=True)`) at the dtype's tolerance `DTYPE_ATOL` (float32
1e-3, float16 5e-2, bfloat16 5e-1). Prints one table a case and a summary line each; exits 1
if any case fails. `--device cpu` runs the same on the CPU (a dry run of this script).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

FAST_VARIANTS = [
    "deit3_small_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_tiny_patch16_224",
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    from deit_port.convert import DTYPE_ATOL, convert_timm_model
    from deit_port.parity import compare_outputs, parity_inputs, reference_stages
    from deit_port.source import create_timm_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=FAST_VARIANTS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}")

    failed = 0
    for model_name in args.models:
        timm_model = create_timm_model(model_name, init="random", seed=args.seed)
        hf = convert_timm_model(create_timm_model(model_name, init="random", seed=args.seed))
        x = parity_inputs(timm_model, n=4, seed=args.seed)
        stages = reference_stages(timm_model.to(device), x)  # float32, as timm evaluates
        expected = next(reversed(stages.values()))
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            hf_model = copy.deepcopy(hf).to(device=device, dtype=dtype)  # from float32
            report = compare_outputs(
                expected, hf_model, x.to(dtype), atol=DTYPE_ATOL[dtype_name], stages=stages
            )
            print(f"\n{model_name} {dtype_name}")
            print(report.table())
            print(report.summary())
            failed += not report.passed
        del timm_model, hf
    print(f"\n{failed} case(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
