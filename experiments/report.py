"""The results document (experiments/RESULTS.md), the README's results table and the figure
(experiments/results/val_by_round.png), all computed from results.json: `write_documents`. The tables
come from tables.py; the findings here are sentences whose every number is computed, and whose verdicts
("outside the scatter", "on every seed") follow from those numbers. matplotlib draws the figure only
(experiments/requirements.txt); without it everything else is written.
"""
import os
import statistics
from pathlib import Path

import records  # first: puts the repository root on sys.path
import free
import tables
from data import atomic_write
from records import SEEDS, phases_of, preset_rounds
from tables import (VAL_MARGIN, by_length, component, hms, longest_curves, paired, per_seed, projected, run_config,
                    signed, spread, threads_of)

README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")  # README.md's results table goes between these
FIGURE = "val_by_round.png"
BUDGET_SECONDS = 600  # the quick preset's first aim: a run in about ten minutes alone on a 2-core CPU
README_ROWS = [("free", "FREE"), ("average", "average of the teachers' weights"), ("random", "random init"),
               ("maml", "MAML on the real images (data-based upper bound)")]
LEVELS = {"maml": ("data-based MAML", "tab:green", "--"), "average": ("average of the teachers", "tab:orange", "-."),
          "random": ("random init", "tab:gray", ":")}  # the figure's horizontal levels: label, colour, line style
DATA_NAMES = {"omniglot": "Omniglot", "synthetic": "synthetic data", "cifarfs": "CIFAR-FS", "miniimagenet": "miniImageNet",
              "cub": "CUB", "mix": "multi-domain data"}


def document_path(results_dir):
    """The results document lies beside the results folder: experiments/results -> experiments/RESULTS.md."""
    return Path(os.path.abspath(results_dir)).parent / "RESULTS.md"


def span(xs, fmt="{:.2f}"):
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)} to {fmt.format(hi)}"


def pct_span(xs):
    return span([100 * x for x in xs], "{:.1f}%")


def every(xs, positive=True):
    """'on every seed' / 'on k/n seeds' for the sign of xs."""
    k = sum((x > 0) == positive for x in xs)
    return "on every seed" if k == len(xs) else f"on {k}/{len(xs)} seeds"


# ------------------------------------------------------------------------ findings


def standing(results, sweep):
    """Where FREE stands: against averaging the teachers, by run length, against data-based MAML."""
    seeds, lines = results.get("seeds", {}), []
    for s in (1, 5):
        d = paired(seeds, ("free", []), ("average", []), s, sweep)
        if d:
            sd = f", std across seeds {statistics.stdev(d):.2f}" if len(d) > 1 else ""
            lines.append(f"- {s}-shot at the preset's {preset_rounds(sweep.preset)} rounds: FREE − average is "
                         f"positive {every(d)}, {span(d, '{:+.2f}')} points{sd} (table 'Accuracy over seeds').")
    avg = per_seed(seeds, "average", [], 1, sweep)
    lengths = {r: [runs[s]["test_acc"] - avg[s]["test_acc"] for s in runs if s in avg]
               for r, runs in by_length(results, sweep).items()}
    lost = [r for r, d in lengths.items() if d and all(x < 0 for x in d)]
    won = [r for r, d in lengths.items() if d and all(x > 0 for x in d)]
    parts = [f"{sign} on every seed at {', '.join(map(str, at))} rounds" for sign, at in (("negative", lost),
                                                                                       ("positive", won)) if at]
    if parts:
        lines.append("- 1-shot by run length (table 'Run length'): FREE − average on the test split is "
                     + "; ".join(parts) + ".")
    curves = longest_curves(results, sweep)
    if curves:
        peaks = {s: max(c, key=lambda p: p[1])[0] for s, c in curves.items()}
        longest = max(c[-1][0] for c in curves.values())
        later = all(p > preset_rounds(sweep.preset) for p in peaks.values())
        lines.append(f"- FREE 1-shot's meta-validation accuracy peaks at round {', '.join(map(str, peaks.values()))} "
                     f"(seed {', '.join(map(str, peaks))}) in runs of up to {longest} rounds"
                     + (f": past the preset's {preset_rounds(sweep.preset)} on every seed, so the preset stops before "
                        f"the method stops learning." if later else "."))
    for s in (1, 5):
        gap = tables.gap_closed(seeds, s, sweep)
        if gap:
            lines.append(f"- {s}-shot: FREE closes {statistics.mean(gap):.0f}% of the gap from random initialisation to "
                         f"data-based MAML on the real images (mean over {len(gap)} seeds).")
    return lines


def quick_rows(results):
    """{(shots, processes × threads): record} of the time table's FREE rows of the quick preset on Omniglot."""
    rows = tables.time_rows(results.get("time", {}))
    return {(r["shots"], threads_of(r)): r for r in rows.values()
            if tables.run_key(r) == ("omniglot", "quick", r["shots"], "free", ())}


def rounds_within(ph, r, budget):
    """The most rounds whose projected rerun (zoo cached) fits `budget` seconds (0 if not even the warm-up does)."""
    fits = [n for n in range(1, 4 * preset_rounds(r["preset"]))
            if projected(ph, run_config(r, n))[1] <= budget]
    return max(fits, default=0)


def cost(results, sweep):
    """What the quick preset costs in time, from the time table (projections of a full run)."""
    lines = []
    for (shots, how), r in sorted(quick_rows(results).items()):
        ph, cfg = phases_of(r), run_config(r)
        phases = tables.projected_phases(ph, cfg)
        first, rerun = projected(ph, cfg)
        replay = phases.get("replay")
        zoo = f"{hms(first)} on a first run (teacher zoo {hms(phases['teacher zoo'])}) and " if "teacher zoo" in phases else ""
        share = f"; MAML replay is {100 * replay / rerun:.0f}% of the latter ({ph['replay']:.2f} s a round)" if replay else ""
        lines.append(f"- {shots}-shot, {how}: a {cfg.rounds}-round run is projected at {zoo}{hms(rerun)} with the zoo "
                     f"cached{share}.")
        if shots == 1:
            n = rounds_within(ph, r, BUDGET_SECONDS)
            other = rerun - (replay or 0.0)
            need = (BUDGET_SECONDS - other) / (cfg.rounds - cfg.warmup)
            lines.append(f"- {shots}-shot, {how}: {BUDGET_SECONDS // 60} minutes alone (zoo cached) buy {n} rounds at "
                         f"this speed; for {cfg.rounds} rounds to fit them, replay would have to take "
                         + (f"under {need:.2f} s a round." if need > 0 else f"no time at all, and more: everything else "
                            f"takes {hms(other)}."))
    timed = tables.time_rows(results.get("time", {}))
    for a, b, _, _ in tables.worker_pairs(timed):
        s, top = tables.speedups(a, b), tables.ceiling(a, b, timed)
        lines.append(f"- {a['shots']}-shot with {threads_of(b)} (workers × threads) against {threads_of(a)}: the projected "
                     f"run is {s['first_run']:.2f}x faster on a first run and {s['rerun']:.2f}x with the zoo cached; "
                     f"replay {tables.cell(s['replay'], '{:.2f}x')}, recovery {tables.cell(s['recovery'], '{:.2f}x')}"
                     + (f"; a perfect split of the 1 × 1 run would give {top[0]['first_run']:.2f}x." if top else "."))
    fo = [r for r in tables.time_rows(results.get("time", {})).values() if r.get("ablations") == ["first-order"]]
    plain = quick_rows(results)
    for r in fo:
        base = plain.get((r["shots"], threads_of(r)))
        if base:
            lines.append(f"- First-order replay (FOMAML, the authors' `--approx`) takes replay from "
                         f"{phases_of(base)['replay']:.2f} to {phases_of(r)['replay']:.2f} s a round and the "
                         f"{r['shots']}-shot run to {hms(projected(phases_of(r), run_config(r))[1])} (zoo cached).")
    curves = longest_curves(results, sweep)
    first = tables.fewest_rounds_ahead(curves, per_seed(results.get("seeds", {}), "average", [], 1, sweep), 0.0)
    if first:
        lines.append(f"- FREE's meta-validation accuracy first beats `average`'s on every seed at round {first}.")
    return lines


def weak_replay(results, sweep):
    """Why replay on the memory bank is a weak signal, from the bank table."""
    bank = results.get("bank")
    if not bank:
        return []
    v = lambda k: [bank[s][k] for s in sorted(bank)]
    lines = [f"- The bank files recovered images under their real class, as the authors' code does (absolute class "
             f"ids), so a class's images come from the {span(v('teachers_per_class'), '{:.1f}')} teachers (mean by "
             f"seed) that hold it, and the support and query images of a replay task's class are often recovered "
             f"from different teachers.",
             f"- Those images are teacher-specific: a teacher labels its own recovered images correctly "
             f"{pct_span(v('own'))} of the time, another teacher that holds the same class labels them correctly "
             f"{pct_span(v('other'))} (chance {100 / free.Config.way:.0f}%), against {pct_span(v('other_real'))} on real "
             f"images of that class (ranges over seeds).",
             f"- After replay's {free.Config.train_inner_steps} inner steps, data-based MAML's best checkpoint scores "
             f"{pct_span(v('maml_on_bank'))} on bank tasks and {pct_span(v('maml_on_real'))} on real meta-train tasks; "
             f"FREE's own scores {pct_span(v('free_on_bank'))} and {pct_span(v('free_on_real'))}."]
    acc = [r["replay_acc"] for r in per_seed(results.get("seeds", {}), "free", [], 1, sweep).values()
           if r.get("replay_acc") is not None]
    if acc:
        lines.append(f"- FREE's replay accuracy on bank tasks near the end of its runs is {span(acc, '{:.3f}')} by "
                     f"seed: about what a meta-learner that is good on real tasks scores on them.")
    lines.append("- How much of the teacher-specificity L_adv causes is not measured.")
    return lines


def components_findings(results, sweep):
    """The components at the preset's rounds: which differences stand clear of the scatter across seeds."""
    seeds, lines = results.get("seeds", {}), []
    found = {f: c for f in tables.components(sweep.preset) if (c := component(seeds, f, sweep))}
    outside = [f for f, c in found.items() if c["outside"]]
    within = [f for f, c in found.items() if not c["outside"]]
    fmt = lambda f: f"`free {f}` ({found[f]['mean']:+.2f})"
    if outside:
        lines.append(f"- FREE − the variant, mean over seeds, outside its spread across seeds (|mean| > std): "
                     f"{', '.join(fmt(f) for f in outside)}.")
    if within:
        lines.append(f"- Within the spread across seeds: {', '.join(fmt(f) for f in within)}.")
    kd_only = per_seed(seeds, *tables.KD_ONLY, 1, sweep)
    rnd = per_seed(seeds, "random", [], 1, sweep)
    both = [s for s in SEEDS if s in kd_only and s in rnd]
    if both:
        without, random_init = (", ".join(f"{r[s]['test_acc']:.2f}" for s in both) for r in (kd_only, rnd))
        lines.append(f"- Without replay (`free --max-replay 0`: recovery, memory bank, KD and Eq. (3)) FREE scores "
                     f"{without}, against random initialisation's {random_init} (seeds {', '.join(map(str, both))}).")
        curves = {s: kd_only[s]["val_curve"] for s in both if kd_only[s].get("val_curve")}
        if curves:
            lines.append(f"  Its meta-validation accuracy is {', '.join(f'{c[0][1]:.2f}' for c in curves.values())} at "
                         f"the first validation and {', '.join(f'{c[-1][1]:.2f}' for c in curves.values())} at the last "
                         f"(seeds {', '.join(map(str, curves))}).")
    if results.get("kd"):
        d = tables.kd_diffs(results["kd"])
        kd = results["kd"]
        zeroed = lambda name: [kd[s][name] for s in sorted(kd)]
        lines.append(f"- Where KD alone moves θ (table 'What KD alone does to θ'), minus θ_0 on meta-validation: the "
                     f"KD-only body with θ_0's head {signed(d['body alone'])}, θ_0's body with the KD-only head "
                     f"{signed(d['head alone'])}, both {signed(d['body and head'])}. From a zeroed head the KD-only body "
                     f"scores {span(zeroed('KD-only body, head zeroed'))} against θ_0's body's "
                     f"{span(zeroed('initial body, head zeroed'))}.")
    nomg, mine = per_seed(seeds, "free", ["--no-meta-generator"], 1, sweep), per_seed(seeds, "free", [], 1, sweep)
    rec = lambda rs: [phases_of(r)["recovery"] for r in rs.values() if phases_of(r).get("recovery") is not None]
    if rec(nomg) and rec(mine):
        lines.append(f"- Recovery from scratch (`free --no-meta-generator`) takes {span(rec(nomg))} s a round against "
                     f"FREE's {span(rec(mine))} s (each run's training-round mean; runs sharing the cores).")
    c = found.get("--no-meta-generator")
    if c and c["replay"] and c["replay"][0] > c["replay"][1] and c["mean"] > 0:
        lines.append(f"- Its bank tasks are easier for replay (replay accuracy {c['replay'][0]:.3f} against FREE's "
                     f"{c['replay'][1]:.3f}), yet it does worse on the test tasks: a higher replay accuracy on the bank "
                     f"does not by itself mean a better meta-learner.")
    hard, paper = found.get("--hard-labels"), tables.PAPER_CIFARFS
    if hard:
        lines.append(f"- Soft against hard labels: FREE − `free --hard-labels` {signed(hard['d'])} here; the paper's "
                     f"CIFAR-FS gap is {paper['free'][0] - paper['free --hard-labels'][0]:+.2f} at 1-shot and "
                     f"{paper['free'][1] - paper['free --hard-labels'][1]:+.2f} at 5-shot.")
    return lines


def quick_counts(results, sweep):
    """How the quick preset's counts were chosen, the numbers read from free.PRESETS and the run-length study."""
    q, c = dict(free.Config().__dict__, **free.PRESETS["quick"]), free.Config()
    first = tables.fewest_rounds_ahead(longest_curves(results, sweep), per_seed(results.get("seeds", {}), "average", [],
                                                                                1, sweep), VAL_MARGIN)
    agree = component(results.get("seeds", {}), "--bank-filter agree", sweep)
    return [f"- Rounds: the FREE 1-shot runs were continued to longer runs (`python experiments/bench.py rounds`, table "
            f"'Run length'), and the preset takes the fewest rounds at which FREE's meta-validation accuracy beats "
            f"`average`'s on the same validation tasks by {VAL_MARGIN:.0f} points or more on every seed"
            + (f": {first} (the preset runs {q['rounds']})." if first else f" (the preset runs {q['rounds']}).")
            + " The rule reads only meta-validation accuracy; its margin is the one the 1-shot comparison asks of the "
            "test split. The price is time (section 'Time').",
            f"- nf = {q['nf']} (paper: {c.nf}): the generator's convolutions dominate recovery and scale with nf².",
            f"- Replay until {q['replay_patience']} meta-batches bring no improvement, at most {q['max_replay']} a round "
            f"(the authors' patience of {c.replay_patience} means at least {c.replay_patience + 1} meta-batches a round, "
            f"most of a CPU run's budget; a cap above the patience lets the stopping rule end replay early).",
            f"- {q['warmup']} warm-up rounds (authors: {c.warmup}); {q['val_tasks']} meta-validation tasks, so that model "
            f"selection is less a matter of task sampling.",
            "- Eq. (3)'s outer scale with Adam was chosen on the meta-validation split only (seed 0, validation at round "
            "20 of `python free.py --dataset omniglot --data-root DIR --preset quick --shots 1 --rounds 40 --eval-every "
            "10` with each scale; see `maml.reptile_scale`); the meta-test split played no part.",
            "- The bank filter stays off, as the paper describes the bank"
            + (f": keeping only the images the teacher labels as Y moves 1-shot accuracy by {agree['mean']:+.2f} on the "
               f"mean, {'outside' if agree['outside'] else 'within'} the scatter across seeds." if agree else ".")]


# ------------------------------------------------------------------------ provenance


def condensed(names):
    """Run names grouped as sweep rows: 'free --no-align, 1-shot' when every seed is there, else per seed."""
    out = []
    for m, f, s in records.SEED_RUNS:
        mine = [seed for seed in SEEDS if records.run_name(m, f + records.seed_flags(seed), s) in names]
        if mine:
            out.append(f"{records.label(m, f)}, {s}-shot" + ("" if len(mine) == len(SEEDS) else
                                                             f" (seed {', '.join(map(str, mine))})"))
    return out


def lengths_of(recs, names):
    """Run-length records as 'FREE 1-shot at 60, 120 rounds (seeds 0, 1, 2)'."""
    rounds = sorted({recs[n]["rounds"] for n in names})
    seeds = sorted({recs[n]["seed"] for n in names})
    return [f"FREE 1-shot at {', '.join(map(str, rounds))} rounds (seeds {', '.join(map(str, seeds))})"]


def provenance(results):
    prov, lines = results.get("provenance", {}), []
    if prov.get("data"):
        lines.append(f"- Data: {prov['data']}")
    if prov.get("machine"):
        lines.append(f"- Machine: {prov['machine']}")
    codes = prov.get("codes", {})
    for section, title in (("seeds", "Accuracy over seeds"), ("rounds", "Run length"), ("time", "Time")):
        recs = results.get(section, {})
        recs = tables.time_rows(recs) if section == "time" else recs
        by_code = {}
        for name, r in recs.items():
            by_code.setdefault(r.get("code", "unknown"), []).append(name)
        for code, names in by_code.items():
            what = "; ".join(condensed(set(names)) if section == "seeds" else lengths_of(recs, names) if section == "rounds"
                             else sorted(names))
            lines.append(f"- {title}, code {code}{': ' + codes[code] if code in codes else ''}: {what}.")
    for section, title in (("recovery", "Recovery speed"), ("teachers", "Teachers"), ("bank", "Memory bank"),
                           ("kd", "KD alone"), ("adapt", "Adapting to other N"),
                           ("resize", "Teachers of another input format"), ("gpu", "GPU")):
        p = prov.get(section)
        if p and section in results:
            lines.append(f"- {title}: " + (f"`{p['command']}` at commit {p['commit']}, {p['machine']}, torch "
                                           f"{p['torch']}, {p['date']}." if "commit" in p else p.get("note", "")))
    for note in prov.get("notes", []):
        lines.append(f"- {note}")
    return lines


# ------------------------------------------------------------------------ README table and figure


def readme_table(results, sweep, doc_link, figure_link):
    seeds = results.get("seeds", {})
    lines = ["| method | 1-shot | 5-shot | paper, CIFAR-FS 1-shot | paper, CIFAR-FS 5-shot |", "|---|---|---|---|---|"]
    for method, name in README_ROWS:
        cells = [spread([r["test_acc"] for r in per_seed(seeds, method, [], s, sweep).values()]) for s in (1, 5)]
        paper = tables.PAPER_CIFARFS.get(method, ("–", "–"))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {paper[0]} | {paper[1]} |")
    cfg = free.Config(**free.PRESETS[sweep.preset])
    data = DATA_NAMES.get(sweep.dataset, sweep.dataset)
    lines += ["", f"{data[0].upper() + data[1:]} 5-way, Conv4, {sweep.preset} preset "
              f"({cfg.rounds} rounds): meta-test accuracy (%) on {cfg.test_tasks} tasks, mean ± std over seeds (n). "
              f"Written by `python experiments/bench.py report`; components, run length, time, provenance: "
              f"[{doc_link}]({doc_link}).", "", f"![meta-validation accuracy by round]({figure_link})"]
    return "\n".join(lines) + "\n"


def figure_series(results, sweep=records.Sweep()):
    """What the figure draws: FREE 1-shot's meta-validation accuracy by round per seed and its mean (at rounds every
    seed validated), and the mean best meta-validation accuracy of average, random and maml 1-shot over seeds."""
    per = {s: [(p[0], p[1]) for p in c] for s, c in longest_curves(results, sweep).items()}
    common = sorted(set.intersection(*({r for r, _ in v} for v in per.values()))) if per else []
    mean = [(r, statistics.mean(dict(per[s])[r] for s in per)) for r in common]
    levels = {}
    for method in LEVELS:
        vals = [r["best_val_acc"] for r in per_seed(results.get("seeds", {}), method, [], 1, sweep).values()
                if r.get("best_val_acc") is not None]
        if vals:
            levels[method] = statistics.mean(vals)
    return {"per_seed": per, "mean": mean, "levels": levels, "preset_rounds": preset_rounds(sweep.preset),
            "title": f"{DATA_NAMES.get(sweep.dataset, sweep.dataset)} 5-way 1-shot, {sweep.preset} preset: "
                     f"meta-validation by round", "xlabel": "round", "ylabel": "meta-validation accuracy (%)"}


def draw_figure(series, path):
    """The figure as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=120)
    for i, (seed, pts) in enumerate(series["per_seed"].items()):
        ax.plot(*zip(*pts), color="tab:blue", alpha=0.35, lw=1, marker="o", ms=3,
                label="FREE, each seed" if i == 0 else None)
    if series["mean"]:
        ax.plot(*zip(*series["mean"]), color="tab:blue", lw=2.5, marker="o", ms=4,
                label=f"FREE, mean over {len(series['per_seed'])} seeds")
    for method, value in series["levels"].items():
        name, colour, style = LEVELS[method]
        ax.axhline(value, color=colour, ls=style, lw=1.5, label=f"{name}: best, mean over seeds ({value:.1f})")
    ax.axvline(series["preset_rounds"], color="black", lw=0.8, alpha=0.4)
    ax.text(series["preset_rounds"], ax.get_ylim()[0], f" preset: {series['preset_rounds']} rounds", fontsize=8,
            va="bottom", alpha=0.6)
    ax.set(xlabel=series["xlabel"], ylabel=series["ylabel"], title=series["title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)
    return True


# ------------------------------------------------------------------------ the document


def section(title, command, body):
    return [f"## {title}", ""] + ([command, ""] if command else []) + ([body.rstrip("\n")] if isinstance(body, str)
                                                                             else body) + [""]


def document(results, sweep, doc_dir, results_dir):
    """RESULTS.md: every table and finding, each number computed from `results`."""
    rel = lambda name: os.path.relpath(os.path.join(results_dir, name), doc_dir)
    cmd = "python experiments/bench.py "
    seeds = results.get("seeds", {})
    teachers = [tables.teachers_line(results["teachers"])] if results.get("teachers") else []
    found = ["# Results", "", "<!-- written by `python experiments/bench.py report` from results.json; do not edit "
             "by hand -->", "",
             f"Measured with `experiments/bench.py` on {DATA_NAMES.get(sweep.dataset, sweep.dataset)} (section "
             f"'Provenance': which code, machine and data made each table). Every number here is computed from "
             f"`{os.path.relpath(os.path.join(results_dir, 'results.json'), doc_dir)}`; the commands are in "
             f"'Reproduce'.", ""]
    found += section("Summary", None, readme_table(results, sweep, "RESULTS.md", rel(FIGURE)).replace(
        "[RESULTS.md](RESULTS.md)", "this document"))
    found += section("Where FREE stands", None, standing(results, sweep) or ["No finished runs yet."])
    found += section(f"Accuracy over seeds ({sweep.preset} preset: {preset_rounds(sweep.preset)} rounds)",
                     f"`{cmd}sweep` prints the runs as commands; `{cmd}seeds` runs them here",
                     tables.seeds_md(seeds, results.get("unfinished"), results.get("missing"), sweep) + "\n"
                     + "\n".join(tables.comparison_lines(seeds, sweep) + teachers))
    if results.get("rounds"):
        found += section("Run length", f"`{cmd}rounds`", tables.rounds_md(results))
    found += section("Components", None,
                     components_findings(results, sweep) + [""] + tables.component_lines(seeds, sweep))
    found += section("Why it takes so many rounds: replay is a weak signal", f"`{cmd}bank`",
                     weak_replay(results, sweep) + ([""] + [tables.bank_md(results["bank"])] if results.get("bank") else []))
    if results.get("kd"):
        found += section("What KD alone does to θ", f"`{cmd}kd`", tables.kd_md(results["kd"]))
    if results.get("adapt"):
        found += section("Adapting to other numbers of classes", f"`{cmd}adapt`", tables.adapt_md(results["adapt"]))
    if results.get("resize"):
        found += section("Teachers of another input format", f"`{cmd}resize`", tables.resize_md(results["resize"]))
    found += section("How the quick counts were chosen", None, quick_counts(results, sweep))
    found += section("What the preset costs", None, cost(results, sweep) or [f"No time table yet: `{cmd}time`."])
    found += section("Time", f"`{cmd}time`", tables.time_md(results["time"]) if results.get("time") else "Not run yet.")
    if results.get("recovery"):
        found += section("Recovery speed", f"`{cmd}recovery`", tables.recovery_md(results["recovery"]))
    found += section("GPU", f"`{cmd}gpu`", tables.gpu_md(results["gpu"]) if results.get("gpu") else
                     f"No GPU run exists yet: `{cmd}gpu` on a CUDA machine writes this section (paper preset, 1- "
                     "and 5-shot: seconds per round and per phase, peak memory, projected full run).")
    if os.path.exists(os.path.join(results_dir, "recovered.png")):
        found += section("Recovered images", None, ["Recovered images of the last round of FREE 1-shot, seed 0 (left, "
                         "one row per class, k steps from the meta-generator) next to real images of the same classes "
                         "(right):", "", f"![recovered]({rel('recovered.png')})"])
    if os.path.isdir(os.path.join(results_dir, "cka")):
        found += section("Teacher heterogeneity (CKA, supplement Figure 1)",
                         "`python cka.py --dataset omniglot --data-root DIR --preset quick --out experiments/results/cka`",
                         ["Linear CKA between teachers' penultimate features on the same real probe images: (a) "
                          "teachers of different tasks, (b) of different data sets, (c) of different architectures.",
                          "", "| (a) different tasks | (b) different data sets | (c) different architectures |",
                          "|---|---|---|", "| " + " | ".join(f"![CKA {p}]({rel(f'cka/cka_{p}.png')})" for p in "abc") + " |"])
    found += section("Provenance", None, provenance(results) or ["No provenance recorded."])
    found += section("Reproduce", None, REPRODUCE)
    return "\n".join(found).rstrip("\n") + "\n"


REPRODUCE = ["    python experiments/bench.py recovery  # recovery speed-up at equal quality, both yardsticks",
             "    python experiments/bench.py sweep > sweep.txt  # the accuracy sweep, one free.py command a line",
             "    parallel -j 2 < sweep.txt             # ... run anywhere (or: xargs -d '\\n' -n 1 -P 2 sh -c < sweep.txt)",
             "    python experiments/bench.py seeds     # ... or run here, --jobs at a time",
             "    python experiments/bench.py time      # the quick preset by phase: 1 process x 2 threads vs 2 workers (and 1 x 1)",
             "    python experiments/bench.py rounds --rounds 60   # FREE 1-shot, seeds 0-2, at 60 rounds (likewise 120, 140)",
             "    python experiments/bench.py rounds    # ... and on to 200, each continuing the longest shorter run",
             "    python experiments/bench.py bank      # teachers on each other's recovered images, bank vs real tasks",
             "    python experiments/bench.py kd        # KD and Eq. (3) alone: bodies and heads swapped",
             "    python experiments/bench.py gpu       # on a CUDA machine: paper preset, s/round by phase",
             "    python experiments/bench.py report    # collect finished runs, rewrite this document and the figure",
             "",
             "Every sweep command is resumable and idempotent (`free.py --resume` starts a run, continues it, or does "
             "nothing if it has finished), so the same list runs under GNU parallel, `xargs -P`, a SLURM job array "
             "(`sweep --slurm FILE`) or `bench.py seeds`; `report` collects whatever has finished (copy the runs' "
             "folders into --runs) and names what is missing. A seed's runs share its teacher zoo: `seeds` builds it "
             "first; jobs started together elsewhere may train the same teachers twice (atomic writes: the same result). "
             "The figure needs matplotlib: `pip install -r experiments/requirements.txt`."]


def write_documents(results, results_dir, sweep=records.Sweep(), readme=None):
    """RESULTS.md beside `results_dir`, the figure in it, and the table of `readme` (a README.md) between
    README_MARKERS if it has them (nothing otherwise). Returns the figure's fate: True drawn, False skipped (no
    matplotlib), None (nothing to draw)."""
    doc = document_path(results_dir)
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = document(results, sweep, str(doc.parent), results_dir)
    atomic_write(doc, lambda f: f.write(text.encode()))
    series = figure_series(results, sweep)
    drawn = draw_figure(series, os.path.join(results_dir, FIGURE)) if series["per_seed"] else None
    if drawn is False:
        print("figure skipped: matplotlib is not installed (pip install -r experiments/requirements.txt)")
    if readme and os.path.exists(readme):
        text = Path(readme).read_text()
        start, end = README_MARKERS
        if start in text and end in text:
            head, rest = text.split(start, 1)
            links = portable_link(doc, readme), portable_link(Path(results_dir) / FIGURE, readme)
            table = readme_table(results, sweep, *links)
            text = head + start + "\n" + table + end + rest.split(end, 1)[1]
            atomic_write(Path(readme), lambda f: f.write(text.encode()))
    return drawn


def portable_link(path, readme):
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(readme)))
