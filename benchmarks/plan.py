"""How planning time grows with tensors and ranks (shapes only, no data).

Prints, for each transition, the time to build both PTCs from the model (meta device +
rule table), the plan time and the coverage check time (medians of --repeats runs, each
in a fresh process so caches do not carry over), the number of tensors, ranks (old + new)
and copies, peak memory, and the ratio of cross-host bytes to the lower bound (must be
1.00; "0 = 0" when nothing needs to cross hosts). Ratios "x first" are against the first
case, measured in the same run.

    python benchmarks/plan.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = [
    ("gpt3-6.7b", "tp=8,pp=4,dp=4", "tp=4,pp=4,dp=8"),
    ("gpt3-6.7b", "tp=8,pp=4,dp=4,zero=1", "tp=4,pp=4,dp=8,zero=1"),
    ("gpt3-175b", "tp=8,pp=16,dp=4", "tp=8,pp=8,dp=8"),
    ("gpt3-175b", "tp=8,pp=16,dp=8", "tp=8,pp=8,dp=16"),
    ("gpt3-175b", "tp=8,pp=16,dp=8,zero=1", "tp=8,pp=8,dp=16,zero=1"),
    ("gpt3-175b", "tp=8,pp=16,dp=16", "tp=4,pp=16,dp=32"),
]

_CHILD = r"""
import json, resource, sys, time
from scalai.config import Placement
from scalai.models import model_ptc
from scalai.planner import Deployment, make_plan
model, a, b = sys.argv[1:4]
ts = time.perf_counter()
old = Deployment(model_ptc(model, a), Placement(8))
new = Deployment(model_ptc(model, b), Placement(8))
t0 = time.perf_counter()
plan = make_plan(old, new, validate=False)
t1 = time.perf_counter()
from scalai.planner import check_coverage
check_coverage(plan)
t2 = time.perf_counter()
s = plan.stats
print(json.dumps({"specs": t0 - ts, "plan": t1 - t0, "validate": t2 - t1, "copies": s.copies,
                  "tensors": len(new.ptc.specs),
                  "ranks": old.ptc.config.world_size + new.ptc.config.world_size,
                  "cross": s.cross_host_bytes, "lb": s.cross_host_lower_bound_bytes,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(model: str, a: str, b: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, model, a, b], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only the first two cases, one run")
    args = ap.parse_args()
    cases = CASES[:2] if args.quick else CASES
    repeats = 1 if args.quick else args.repeats
    rows = []
    for model, a, b in cases:
        runs = [measure(model, a, b) for _ in range(repeats)]
        print(f"  {model} {a} -> {b}: {[round(r['plan'], 2) for r in runs]} s", file=sys.stderr)
        med = {k: statistics.median(r[k] for r in runs) for k in ("specs", "plan", "validate", "rss_mb")}
        rows.append((model, a, b, runs[0], med))
    base = rows[0][4]["plan"]
    hdr = f"{'model':10} {'from -> to':46} {'tensors':>7} {'ranks':>6} {'copies':>9} " \
          f"{'specs s':>7} {'plan s':>7} {'x first':>7} {'check s':>8} {'peak MB':>8} {'cross/LB':>8}"
    print(hdr)
    print("-" * len(hdr))
    for model, a, b, r, med in rows:
        ratio = "0 = 0" if r["lb"] == 0 == r["cross"] else f"{r['cross'] / max(1, r['lb']):.2f}"
        print(f"{model:10} {a + ' -> ' + b:46} {r['tensors']:>7} {r['ranks']:>6} {r['copies']:>9,} "
              f"{med['specs']:>7.2f} {med['plan']:>7.2f} {med['plan'] / base:>7.2f} {med['validate']:>8.2f} "
              f"{med['rss_mb']:>8.0f} {ratio:>8}")


if __name__ == "__main__":
    main()
