"""Bundle a trained run's final student for the notebooks and for trying --eval / --predict
without training: fp16 weights (each file well under 5 MB), no teacher, no optimizer; then score
those exact weights as `--eval` does and record the command that trained them beside the scores.

    python models/bundle.py RUN/final.pt models/NAME.pt --command "python bcp_minimal.py ..."

models/models.json holds every bundle's record; models/README.md is written from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import bcp_minimal as bm  # noqa: E402
import get_data as gd  # noqa: E402


def bundle(src, dst, command, root=None, split=None, machine=""):
    """-> the record of models/NAME.pt made from checkpoint src, scored on split of root."""
    state = gd.load_checkpoint(src)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    cfg = {**state["cfg"], **({"root": root} if root else {}), "eval_model": "student"}
    small = {"format": "bcp_minimal/1", "cfg": cfg, "stage": state["stage"],
             "iter": state["iter"], "model": half, "teacher": None, "optimizer": None,
             "scaler": None, "rng": []}
    gd.save_checkpoint(dst, small)
    run_cfg = bm.config_from_checkpoint(gd.load_checkpoint(dst), {
        "device": "cpu", **({"eval_split": split} if split else {})})
    model, used = bm.scored_model(run_cfg, small, torch.device("cpu"))
    m = bm.evaluate(model, run_cfg, progress=False)
    record = {"file": Path(dst).name, "command": command, "machine": machine, "data": run_cfg.data,
              "root": run_cfg.root, "split": run_cfg.eval_split, "scored": used,
              "bytes": Path(dst).stat().st_size,
              **{k: round(m[k], 4) for k in ("dice", "jaccard", "hd95", "asd")},
              **({"classes": {c: round(v["dice"], 4) for c, v in m["classes"].items()}}
                 if "classes" in m else {})}
    book = HERE / "models.json"
    records = json.loads(book.read_text()) if book.is_file() else {}
    records[Path(dst).stem] = record
    book.write_text(json.dumps(records, indent=2) + "\n")
    write_readme(records)
    return record


def write_readme(records):
    lines = ["# Trained models", "", "Student weights in fp16 (no teacher, no optimizer), made by "
             "`models/bundle.py` from the final checkpoint of the command beside each; the "
             "scores are those exact weights', as `--eval` computes them (Dice, Jaccard: "
             "fractions; 95HD, ASD: voxels). Each loads with `python bcp_minimal.py --eval "
             "models/NAME.pt` or `--predict SCANS --ckpt models/NAME.pt`.", "",
             "| file | trained by | on | scored on | Dice | Jaccard | 95HD | ASD | size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records.values():
        lines.append(f"| `{r['file']}` | `{r['command']}` | {r.get('machine', '')} | "
                     f"{r['root']}, {r['split']}.list | "
                     f"{r['dice']:.4f} | {r['jaccard']:.4f} | {r['hd95']:.2f} | {r['asd']:.2f} "
                     f"| {r['bytes'] / 1e6:.1f} MB |")
    (HERE / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a run's checkpoint, e.g. runs/sample/final.pt")
    p.add_argument("dst", help="models/NAME.pt")
    p.add_argument("--command", required=True, help="the command that trained src")
    p.add_argument("--root", help="data folder recorded in the bundle (default: the run's)")
    p.add_argument("--split", help="the list scored (default: the run's eval split)")
    p.add_argument("--machine", default="", help="where it trained, e.g. '2-core CPU, fp32'")
    a = p.parse_args(argv)
    print(json.dumps(bundle(a.src, a.dst, a.command, a.root, a.split, a.machine), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
