"""Collect the evaluate.txt files of a zero-shot evaluation into one table.

    python -m lavis_vpgtrans.analysis.eval_table OUT_DIR [--json FILE]

OUT_DIR holds one folder per benchmark (as run_scripts/eval_all.sh writes them):
OUT_DIR/<benchmark>/<job id>/evaluate.txt, whose lines are {split: metrics} (our tasks' log).
Caption metrics are shown x100, as papers report them (pycocoevalcap's CIDEr 1.2 -> 120.0);
VQA / GQA accuracies are already percentages.
"""

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

BENCHMARKS = ("coco_caption", "nocaps", "vqav2", "okvqa", "gqa")
# benchmark -> [(label, metric key, scale)]
COLUMNS = {
    "coco_caption": [("CIDEr", "CIDEr", 100), ("BLEU-4", "Bleu_4", 100), ("METEOR", "METEOR", 100),
                     ("ROUGE-L", "ROUGE_L", 100), ("SPICE", "SPICE", 100)],
    "nocaps": [("CIDEr", "CIDEr", 100), ("CIDEr in-domain", "CIDEr_in-domain", 100),
               ("CIDEr near-domain", "CIDEr_near-domain", 100), ("CIDEr out-domain", "CIDEr_out-domain", 100),
               ("SPICE", "SPICE", 100)],
    "vqav2": [("accuracy", "acc", 1)],
    "okvqa": [("accuracy", "acc", 1)],
    "gqa": [("accuracy", "acc", 1)],
}
NOT_COMPUTED = {"SPICE": "n/a (needs Stanford CoreNLP)"}


def read_eval_log(path: str) -> Dict[str, dict]:
    """{split: metrics}, the last line for each split winning."""
    out: Dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            for split, metrics in record.items():
                if isinstance(metrics, dict):
                    out[split] = metrics
    return out


def find_eval_log(bench_dir: str) -> Optional[str]:
    """The newest evaluate.txt under a benchmark's output folder."""
    logs = glob.glob(os.path.join(bench_dir, "evaluate.txt")) + glob.glob(os.path.join(bench_dir, "*", "evaluate.txt"))
    return max(logs, key=os.path.getmtime) if logs else None


def collect(out_dir: str, benchmarks=BENCHMARKS) -> Dict[str, Optional[dict]]:
    results: Dict[str, Optional[dict]] = {}
    for bench in benchmarks:
        log = find_eval_log(os.path.join(out_dir, bench))
        if log is None:
            results[bench] = None
            continue
        splits = read_eval_log(log)
        if not splits:
            results[bench] = None
            continue
        split = sorted(splits)[-1] if len(splits) > 1 else next(iter(splits))
        results[bench] = {"split": split, "metrics": splits[split], "file": log}
    return results


def table_rows(results: Dict[str, Optional[dict]]) -> List[List[str]]:
    rows = []
    for bench, res in results.items():
        if res is None:
            rows.append([bench, "-", "-", "no result (see its log)"])
            continue
        for label, key, scale in COLUMNS.get(bench, []):
            value = res["metrics"].get(key)
            if value is None:
                text = NOT_COMPUTED.get(label, "missing")
            else:
                text = f"{float(value) * scale:.2f}"
            rows.append([bench, res["split"], label, text])
    return rows


def format_table(results: Dict[str, Optional[dict]]) -> str:
    rows = [["benchmark", "split", "metric", "value"]] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--json", default=None, help="also write the collected metrics here")
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    results = collect(args.out_dir, args.benchmarks)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r is not None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
