"""BIDS indexers compared: import time, time to index a tiny N-subject BIDS
tree, and what each adds to the environment (issue 12 item 3 chose one).

Each indexer runs in its own interpreter (``--python NAME=PATH``, a venv
holding it), once per repeat, interleaved, so the machine's load falls on
both alike; the minimum of the repeats is reported with the load average.

Measured 2026-12-04 (2 shared cores; 1000 subjects, 1100 series; min of 3):
load 5.6: pybids 0.22.0 import 0.36 s, index 4.44 s; bids2table 2.3.1 import
0.09 s, index 0.52 s. load 7.9: pybids 0.69 s / 9.13 s; bids2table 0.29 s /
1.90 s; dmriflow's discovery (bids2table imported inside) 1.52 s. Added to the
lock: bids2table 4 packages (bids2table, bidsschematools, pyarrow, pyyaml;
~172 MB, pyarrow 170 MB of it); pybids 14 (pybids, bids-validator,
bidsschematools, sqlalchemy, formulaic, num2words, docopt, frozendict,
interface-meta, narwhals, pathlib-abc, universal-pathlib, wrapt, pyyaml;
~45 MB). bids2table was chosen: ~8.5x faster indexing (pybids' 4.4-9 s
alone would spend the 5 s budget of a cached 1000-subject rerun).

Usage: python bench/bids_index.py --subjects 1000 \
    --python pybids=/tmp/venv-pybids/bin/python --python bids2table=.venv/bin/python \
    --python dmriflow=.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPEATS = 3
#: One series per subject, two runs for every tenth (the case units exist for).
TWO_RUNS_EVERY = 10
#: Run in the indexer's interpreter: prints {"import_s", "index_s", "series"}.
PROBES = {
    "pybids": """
import json, sys, time
t = time.perf_counter(); import bids; t_imp = time.perf_counter() - t
t = time.perf_counter()
lay = bids.BIDSLayout(sys.argv[1], validate=False)
n = len(lay.get(suffix="dwi", extension=[".nii", ".nii.gz"]))
print(json.dumps({"import_s": t_imp, "index_s": time.perf_counter() - t, "series": n}))
""",
    "bids2table": """
import json, sys, time
t = time.perf_counter(); import bids2table; t_imp = time.perf_counter() - t
t = time.perf_counter()
tab = bids2table.index_dataset(sys.argv[1])
n = sum(1 for s, e in zip(tab.column("suffix").to_pylist(), tab.column("ext").to_pylist())
        if s == "dwi" and e in (".nii", ".nii.gz"))
print(json.dumps({"import_s": t_imp, "index_s": time.perf_counter() - t, "series": n}))
""",
    # dmriflow's BIDS discovery (bids2table inside, imported on first use): index
    # time is discover()'s, units included (one per series)
    "dmriflow": """
import json, sys, time
t = time.perf_counter(); from dmriflow.pipelines.inputs import discover
t_imp = time.perf_counter() - t
t = time.perf_counter()
n = len(discover(sys.argv[1], layout="bids"))
print(json.dumps({"import_s": t_imp, "index_s": time.perf_counter() - t, "series": n}))
""",
}


def write_tree(root: Path, n: int) -> int:
    """A BIDS tree of empty-content files (indexers read names, not images);
    the number of DWI series."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    series = 0
    for i in range(n):
        d = root / f"sub-{i:04d}" / "dwi"
        d.mkdir(parents=True)
        runs = ("_run-1", "_run-2") if i % TWO_RUNS_EVERY == 0 else ("",)
        for run in runs:
            stem = d / f"sub-{i:04d}{run}_dwi"
            for ext in (".nii.gz", ".bval", ".bvec", ".json"):
                Path(str(stem) + ext).write_text("{}" if ext == ".json" else "0")
            series += 1
    return series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--python", action="append", required=True, metavar="NAME=PATH")
    args = ap.parse_args()
    pythons = dict(p.split("=", 1) for p in args.python)
    with tempfile.TemporaryDirectory(prefix="dmriflow-bench-index-") as tmp:
        root = Path(tmp, "bids")
        expected = write_tree(root, args.subjects)
        best: dict[str, dict] = {}
        for _ in range(REPEATS):
            for name, python in pythons.items():
                out = subprocess.run([python, "-c", PROBES[name], str(root)], check=True,
                                     capture_output=True, text=True).stdout
                got = json.loads(out.strip().splitlines()[-1])
                if got["series"] != expected:
                    raise SystemExit(f"{name} found {got['series']} series, not {expected}")
                prev = best.setdefault(name, got)
                for k in ("import_s", "index_s"):
                    prev[k] = min(prev[k], got[k])
    print(f"load average {os.getloadavg()[0]:.2f}; {args.subjects} subjects, "
          f"{expected} DWI series; min of {REPEATS}")
    for name, r in best.items():
        print(f"{name:<11} import {r['import_s']:6.2f} s   index {r['index_s']:6.2f} s")


if __name__ == "__main__":
    main()
