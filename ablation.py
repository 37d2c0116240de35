"""Why BCP works, measured: the paper's ablations and its label-efficiency claim on ACDC, each a
row of bcp_minimal runs that differ in one flag, all at one budget, scored on val.list.

    python ablation.py --root data/ACDC --work runs/ablation            # the ablation table
    python ablation.py --root data/ACDC --work runs/ablation --labels   # 1, 3, 7 patients
    python ablation.py --work runs/ablation --report                    # table + figure only

Budget: the ACDC_cpu preset at 600 + 1 200 iterations (3 labeled patients unless --labels),
no test-time augmentation, fp32 on every CPU (--amp off), the final student scored on the 20
val.list volumes: 4 min a run at 2 threads on a 2-core AMD EPYC with AVX-512, 23 min on one
with AVX2 only. Each run is
`python bcp_minimal.py ... --out WORK/<row>/s<seed>`: a finished run (its metrics.json) is
kept, a killed one resumed (--resume), so the command can be stopped and started again;
the table is printed and written (WORK/table.md, table.json, figure.png; --labels: labels.md,
labels.json, labels.png) after every run.
--jobs 2 runs two at a time, one thread each. docs/ablation/ holds the metrics.json of the runs
behind the README's table: `--work docs/ablation --report` rewrites it; copy docs/ablation into
WORK and the grid goes on from there.

The rule, fixed before any run and printed with the table: a row is called better or worse
than "both" (BCP as the paper) only where the two means differ by more than the larger of the
two standard deviations over seeds; otherwise "no difference at this budget".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET = ["--data", "ACDC_cpu", "--pretrain-iters", "600", "--selftrain-iters", "1200",
          "--eval-tta", "false", "--eval-split", "val", "--amp", "off"]
SEEDS = [1337, 2, 3]
RULE = ("a row is better or worse than 'both' only where the means differ by more than the "
        "larger of the two standard deviations; otherwise 'no difference at this budget'")

# (name, what it is, its flags, seeds, what the paper says of it). The paper's ablations ran on
# the full budget (ACDC 10 000 + 30 000 iterations, GPU); its tables give the order, quoted here.
ROWS = [
    ("sup", "supervised only (labeled crops)", ["--method", "sup"], 3, ""),
    ("none", "no copy-paste at all (Mean Teacher)", ["--direction", "none", "--pretrain-mix",
                                                      "false"], 3, "75.8 (authors, ACDC 3 pat.)"),
    ("in", "inward only: X_in twice", ["--direction", "in"], 3, "below both (Table 4)"),
    ("out", "outward only: X_out twice", ["--direction", "out"], 3, "below both (Table 4)"),
    ("within", "within one kind: l into l, u into u", ["--direction", "within"], 3,
     "below both (Table 4)"),
    ("both", "both directions (BCP)", [], 3, "87.59 (ACDC, 3 patients)"),
    ("no_pre_mix", "both, no copy-paste in pre-training", ["--pretrain-mix", "false"], 3,
     "below both (Table 9)"),
    ("beta_1_2", "beta = 1/2", ["--beta", "0.5"], 2, "2/3 best (Table 7)"),
    ("beta_5_6", "beta = 5/6", ["--beta", str(5 / 6)], 2, "2/3 best (Table 7)"),
    ("alpha_0.25", "alpha = 0.25", ["--alpha", "0.25"], 2, ""),
    ("alpha_1", "alpha = 1", ["--alpha", "1"], 2, ""),
    ("cubes", "mask: 27 random blocks (official random_mask)", ["--mask-shape", "cubes"], 2,
     "below the box (Table 6)"),
    ("slab", "mask: a contact slab", ["--mask-shape", "slab"], 2, "below the box (Table 6)"),
]
LABELS = [(f"{m}_{n}", f"{m}, {n} labeled patients", ["--method", m, "--labeled", str(n)], 2, "")
          for n in (1, 3, 7) for m in ("sup", "bcp")]
# At 3 patients (ACDC_cpu's default) the label rows are the grid's sup and both rows, the same
# command: in one WORK they share their runs (folders), so the curve costs 8 runs, not 12.
FOLDER = {"sup_3": "sup", "bcp_3": "both"}


def run_dir(work, name, seed):
    return Path(work) / FOLDER.get(name, name) / f"s{seed}"


def dice_of(folder):
    """The mean val Dice of a finished run, else None."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("dice")


def plan(rows, seeds=None):
    """(row, seed) pairs in the order they run: every row at the first seed, then the next, so
    that a partial grid is a whole table at fewer seeds."""
    return [(r, s) for i, s in enumerate(seeds or SEEDS) for r in rows if i < r[3]]


def command(row, seed, a):
    out = run_dir(a.work, row[0], seed)
    resume = (out / "ckpt_last.pt").is_file()
    flags = (["--resume", "--out", str(out)] if resume else [
        *BUDGET, "--root", str(a.root), *row[2], "--seed", str(seed), "--out", str(out),
        *a.extra.split()])
    return [sys.executable, str(HERE / "bcp_minimal.py"), *flags], out


def summarize(rows, work):
    """-> [dict(row, what, dice per seed, mean, sd, verdict, paper)] with the rule applied."""
    table = []
    for name, what, _, n, paper in rows:
        d = [dice_of(run_dir(work, name, s)) for s in SEEDS[:n]]
        done = [x for x in d if x is not None]
        mean = statistics.mean(done) if done else None
        sd = statistics.stdev(done) if len(done) > 1 else None
        table.append(dict(row=name, what=what, dice=d, mean=mean, sd=sd, paper=paper))
    by = {r["row"]: r for r in table}
    for r in table:  # ablations against "both"; label efficiency: BCP against sup, same count
        ref = by.get(r["row"].replace("bcp_", "sup_")) if r["row"].startswith("bcp_") else (
            None if r["row"].startswith("sup_") else by.get("both"))
        r["verdict"] = verdict(r, ref)
    return table


def verdict(r, ref):
    """The rule (module docstring) for row r against the reference row (None: none)."""
    if ref is None or r is ref:
        return "reference" if r is ref or r["row"] == "both" else ""
    if r["sd"] is None or ref["sd"] is None:
        return "needs 2 seeds"
    diff = r["mean"] - ref["mean"]
    if abs(diff) <= max(r["sd"], ref["sd"]):
        return "no difference at this budget"
    return f"{'better' if diff > 0 else 'worse'} ({diff:+.3f})"


def markdown(table):
    ref = "vs sup" if table and table[0]["row"].startswith("sup_") else "vs both"
    lines = [f"| row | Dice per seed | mean ± sd | {ref} | paper |", "|---|---|---|---|---|"]
    for r in table:
        seeds = " / ".join("·" if x is None else f"{x:.3f}" for x in r["dice"])
        ms = "" if r["mean"] is None else f"{r['mean']:.3f}" + (
            "" if r["sd"] is None else f" ± {r['sd']:.3f}")
        lines.append(f"| {r['what']} | {seeds} | {ms} | {r['verdict']} | {r['paper']} |")
    rule = RULE.replace("'both'", "sup at the same count") if ref == "vs sup" else RULE
    return "\n".join(lines) + f"\n\nRule: {rule}.\n"


def figure(table, path, labels=False):
    """Each row's per-seed Dice (dots) and mean (bar); --labels: Dice against labeled patients."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6) if labels else (8, 0.42 * len(table) + 1))
    if labels:
        for method, color in (("sup", "tab:gray"), ("bcp", "tab:red")):
            rs = [r for r in table if r["row"].startswith(method + "_")]
            xs = [int(r["row"].split("_")[1]) for r in rs]
            for x, r in zip(xs, rs):
                ax.plot([x] * sum(d is not None for d in r["dice"]),
                        [d for d in r["dice"] if d is not None], "o", color=color, alpha=0.5)
            done = [(x, r["mean"]) for x, r in zip(xs, rs) if r["mean"] is not None]
            ax.plot(*zip(*done) if done else ([], []), "-", color=color,
                    label="BCP" if method == "bcp" else "supervised only")
        ax.set(xlabel="labeled patients (ACDC)", ylabel="val Dice (mean of RV, Myo, LV)",
               xticks=[1, 3, 7])
        ax.legend()
    else:
        for i, r in enumerate(table):
            if r["mean"] is not None:
                ax.barh(i, r["mean"], color="tab:red" if r["row"] == "both" else "tab:gray",
                        alpha=0.4)
            ax.plot([d for d in r["dice"] if d is not None],
                    [i] * sum(d is not None for d in r["dice"]), "ko", ms=3)
        ax.set_yticks(range(len(table)), [r["what"] for r in table], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("val Dice (ACDC, mean of RV, Myo, LV), dots: seeds")
        low = min([d for r in table for d in r["dice"] if d is not None] or [0])
        ax.set_xlim(max(0, low - 0.05), 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def box_share(y, M):
    """The share of the labeled foreground (y > 0, (n, *P)) inside the mask's box (M == 0, (*P)):
    what X_in = x M + u (1 - M) covers with the unlabeled crop, and X_out shows of it."""
    fg = y > 0
    return float((fg & (M == 0)).sum() / fg.sum().clamp(min=1))


def coverage(root, draws=200, patients=3):
    """box_share over `draws` training draws (crops and masks as ACDC_cpu draws them)."""
    import bcp_minimal as bm
    run = bm.make_run(bm.make_config("ACDC_cpu", root=root, labeled=patients, method="sup",
                                     device="cpu"))
    shares = []
    for _ in range(draws):
        _, y = run.lab.batch(run.lab.draw(run.cfg.batch_size // 2))
        M = bm.bcp_mask(run.cfg.patch, run.cfg.beta, run.cfg.mask_center, run.g)
        shares.append(box_share(y, M))
    return statistics.mean(shares)


def report(rows, a):
    table = summarize(rows, a.work)
    text = markdown(table)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    stem = "labels" if a.labels else "table"  # labels.md/json/png beside table.md/json, figure
    (work / f"{stem}.md").write_text(text)
    (work / f"{stem}.json").write_text(json.dumps({"rule": RULE, "budget": BUDGET,
                                                   "rows": table}, indent=2))
    figure(table, work / ("labels.png" if a.labels else "figure.png"), labels=a.labels)
    print(text, flush=True)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/ACDC", help="the ACDC folder (SSL4MIS layout)")
    p.add_argument("--work", default="runs/ablation", help="where the runs and the table go")
    p.add_argument("--labels", action="store_true", help="label efficiency: 1, 3, 7 labeled "
                   "patients, BCP and supervised only, 2 seeds")
    p.add_argument("--rows", nargs="+", help="only these rows, run in this order (default: "
                   "all); the table keeps its own order")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each if > 1)")
    p.add_argument("--report", action="store_true", help="write the table from finished runs")
    p.add_argument("--extra", default="", help="flags added to every run (e.g. a tiny budget)")
    p.add_argument("--coverage", action="store_true", help="print the share of the labeled "
                   "hearts the box covers (why inward only fails on ACDC) and stop")
    a = p.parse_args(argv)
    if a.coverage:
        share = coverage(a.root)
        print(f"the box (beta 2/3) covers {share:.1%} of the labeled foreground: X_in hides it "
              f"under the unlabeled crop, X_out pastes it with its ground truth")
        return 0
    rows = [r for r in (LABELS if a.labels else ROWS) if not a.rows or r[0] in a.rows]
    if a.report:
        report(rows, a)
        return 0
    order = sorted(rows, key=lambda r: a.rows.index(r[0])) if a.rows else rows
    todo = [(r, s) for r, s in plan(order) if dice_of(run_dir(a.work, r[0], s)) is None]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if a.jobs > 1 else {})}
    running, failed = [], []
    while todo or running:
        while todo and len(running) < a.jobs:
            (row, seed), todo = todo[0], todo[1:]
            cmd, out = command(row, seed, a)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "stdout.txt", "a")
            print(f"{time.strftime('%H:%M')} start {row[0]} seed {seed}", flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            row, seed, out, log))
        time.sleep(0.2)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            job[4].close()
            if job[0].returncode:
                failed.append(f"{job[1][0]} seed {job[2]} (exit {job[0].returncode}; "
                              f"{job[3] / 'stdout.txt'})")
                print("failed:", failed[-1], flush=True)
            report(rows, a)
    if failed:
        print(f"{len(failed)} runs failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    report(rows, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
