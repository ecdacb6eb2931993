"""Compare the accuracy columns of two sampler-benchmark metrics.jsonl files, row by row.

    python compare_runs.py BEFORE/metrics.jsonl AFTER/metrics.jsonl

Rows are matched on (method, nfe_target, rtol); every non-timing field must be exactly equal (== on
the JSON values, so 0 difference, not a tolerance). Rows present in only one file are listed
(a new sweep may add methods); the exit status is 1 on any difference in a shared row.
"""

import json
import sys

TIMING = {"compile_s", "sample_ms", "compile_s@10", "compile_s@200", "ratio"}


def load(path):
    runs, other = {}, []
    for line in open(path):
        r = json.loads(line)
        if r.get("kind") == "run":
            runs[(r["method"], r["nfe_target"], r.get("rtol"))] = r
        else:
            other.append(r)
    return runs, other


def main(before, after):
    a, a_other = load(before)
    b, b_other = load(after)
    shared = sorted(set(a) & set(b), key=str)
    diffs, values = [], 0
    for key in shared:
        fields = (set(a[key]) | set(b[key])) - TIMING - {"step", "time"}
        for f in sorted(fields):
            values += 1
            if a[key].get(f) != b[key].get(f):
                diffs.append((key, f, a[key].get(f), b[key].get(f)))
    orders_a = next((r for r in a_other if r.get("kind") == "orders"), {})
    orders_b = next((r for r in b_other if r.get("kind") == "orders"), {})
    for k in sorted(set(orders_a) & set(orders_b) - {"kind", "step", "time"}):
        values += 1
        if orders_a[k] != orders_b[k]:
            diffs.append((("orders", k), "order", orders_a[k], orders_b[k]))
    print(f"{len(shared)} run rows compared ({values} values incl. orders); {len(diffs)} differ")
    print(f"only before: {sorted(set(a) - set(b), key=str)}")
    print(f"only after: {sorted(set(b) - set(a), key=str)}")
    for d in diffs:
        print("DIFF", *d)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
