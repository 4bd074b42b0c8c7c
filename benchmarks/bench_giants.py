"""Benchmark: the giant ViTs (huge, giant, gigantic) converted with verification, time and peak
RSS against the size of their weights.

Run: `python benchmarks/bench_giants.py [--models ...] [--out docs/family.md]`. Offline: each
model is `deit-port convert NAME OUT --init random` (seeded random weights, the parity check
on), one at a time, each in a fresh process; the peak RSS is the child's maxrss. Before each,
`MemAvailable` is read: a model whose verified conversion (deit_port's own estimate,
`deit_port.headroom`) does not fit is run with `--no-verify` instead and the table says so;
one whose `--no-verify` conversion does not fit either is not run. The table is written, as
markdown, to `--out`, headed by the command that regenerates it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIANTS = ["vit_huge_patch14_224", "vit_giant_patch14_224", "vit_gigantic_patch14_224"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "family.md"
STEP = re.compile(r"([a-z][a-z0-9 ]*) (\d+\.\d+) s")
GIB = 1024**3


def mem_available() -> int:
    """`MemAvailable` of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_child(argv: list[str]) -> tuple[float, int, int, str]:
    """Run `argv` in a fresh process: (wall seconds, peak RSS bytes, exit code, stderr)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), stderr


def bench(name: str, work: Path) -> dict:
    from deit_port.headroom import estimate_convert
    from deit_port.registry import build_on_meta

    model = build_on_meta(name)
    params = sum(p.numel() for p in model.parameters())
    verified = estimate_convert(model, verify=True)
    unverified = estimate_convert(model, verify=False)
    available = mem_available()
    row = {
        "model": name,
        "params": params,
        "weights_bytes": params * 4,
        "available_bytes": available,
        "estimate_verified_bytes": verified,
        "estimate_no_verify_bytes": unverified,
    }
    if verified <= available:
        flags = []
    elif unverified <= available:
        flags = ["--no-verify"]
    else:
        return row | {"run": "not run: not even --no-verify fits"}
    out = work / name
    argv = ["deit-port", "convert", name, str(out), "--init", "random", *flags]
    wall, rss, code, stderr = run_child(argv)
    steps_line = next((x for x in stderr.splitlines() if "time per step: " in x), "")
    written = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.is_dir() else 0
    shutil.rmtree(out, ignore_errors=True)
    return row | {
        "run": " ".join(argv[1:3] + flags),
        "exit": code,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": rss,
        "written_bytes": written,
        "steps": {k: float(v) for k, v in STEP.findall(steps_line.split("per step: ")[-1])},
        "last_line": stderr.strip().splitlines()[-1] if code else "",
    }


def table(rows: list[dict]) -> str:
    head = (
        "| model | parameters | weights (float32) | run | wall | peak RSS | peak / weights "
        "| estimate (verified / --no-verify) | MemAvailable before |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        weights = r["weights_bytes"]
        est = (
            f"{r['estimate_verified_bytes'] / GIB:.1f} / "
            f"{r['estimate_no_verify_bytes'] / GIB:.1f} GiB"
        )
        if "wall_s" not in r:
            ran = f"{r['run']} | - | - | -"
        else:
            ok = "" if r["exit"] == 0 else f" (exit {r['exit']}: {r['last_line']})"
            ran = (
                f"`{r['run']}`{ok} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / GIB:.1f} GiB "
                f"| {r['peak_rss_bytes'] / weights:.2f}"
            )
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f} M | {weights / GIB:.2f} GiB | {ran} "
            f"| {est} | {r['available_bytes'] / GIB:.1f} GiB |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=GIANTS)
    parser.add_argument("--workdir", default=None, help="where the outputs go (removed after)")
    parser.add_argument("--out", default=str(DOCS), help="markdown file for the table")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for name in args.models:
            row = bench(name, Path(work))
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = "python benchmarks/bench_giants.py" + (
        "" if args.models == GIANTS else " --models " + " ".join(args.models)
    )
    text = Path(args.out).read_text() if Path(args.out).exists() else ""
    marker = "<!-- giants table -->"
    body = f"{marker}\nRegenerate: `{command}` (one model at a time, `--init random`).\n\n"
    body += table(rows) + marker
    if text.count(marker) == 2:
        before, _, rest = text.partition(marker)
        _, _, after = rest.partition(marker)
        text = before + body + after
    else:
        text = text + "\n" + body + "\n"
    Path(args.out).write_text(text)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
