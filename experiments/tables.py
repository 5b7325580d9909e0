"""The tables of the results document (experiments/RESULTS.md), each computed from results.json: recovery
speed, accuracy over seeds, run length, time by phase (and the projection of a full run), the memory
bank, KD alone, the GPU. Also the arithmetic they share: mean ± std over seeds, per-seed differences,
the projection of a full run from a short one's phase times, speed-ups.
"""
import statistics

import records  # first: puts the repository root on sys.path
import free
import run
import settings
from records import REPLAY_WINDOW, SEEDS, SEED_RUNS, label, phases_of, preset_rounds, run_name, seed_flags

CHECKPOINTS = (5, 10, 20, 50, 100, 200, 400)  # `recovery`: from-scratch steps at which the student yardstick is taken
BANK_TASKS = 200  # `bank`: tasks of each kind (as many as the quick preset validates on)
KD_ONLY = ("free", ["--max-replay", "0"])  # `kd`: the run whose meta-learner learns from KD + Eq. (3) alone
KD_ROWS = [  # `kd`: (row, body, head): theta_0 at the run's start, after KD alone, after FREE
    ("initial θ_0 (random init)", "init", "init"),
    ("initial body, head zeroed", "init", None),
    ("initial body, KD-only run's head", "init", "kd"),
    ("KD-only run", "kd", "kd"),
    ("KD-only body, head zeroed", "kd", None),
    ("KD-only body, initial head", "kd", "init"),
    ("FREE", "free", "free"),
    ("FREE's body, head zeroed", "free", None),
]
# the paper's CIFAR-FS numbers (Table 2 of the paper and supplement Table 2, Conv4 5-way), beside ours
PAPER_CIFARFS = {"free": (39.13, 52.58), "free --hard-labels": (37.81, 50.35)}
VAL_MARGIN = 3.0  # the quick preset's rounds: the fewest at which FREE's meta-val beats average's by this on every seed
PHASE_NAMES = {"recovery": "recovery", "kd": "KD + Eq. (3)", "replay": "replay"}  # a training round's phases


def components(preset="quick"):
    """What each ablation or setting of the sweep removes, for the component lines."""
    return {"--no-align": "Eq. (3) alignment (vs independent KD steps)",
            "--hard-labels": "soft-label KD (vs CE on hard labels, supplement Table 2)",
            "--no-meta-generator": f"the meta-generator (vs {free.PRESETS[preset].get('recover_steps')} from-scratch steps)",
            "--theta-tilde-opt sgd": "Adam on theta_tilde (vs plain SGD)",
            "--no-kd-augment": "A(.) on the KD images (vs none)",
            "--bank-filter agree": "keeping every recovered image (vs only those the teacher labels as Y)",
            "--max-replay 0": "cross-task MAML replay (vs none: KD and Eq. (3) alone)",
            "--max-replay 1": f"up to {free.PRESETS[preset].get('max_replay', free.Config.max_replay)} replay "
                              f"meta-batches a round (vs 1)",
            "--no-kd": "KD with Eq. (3) (vs none: replay alone)",
            "--first-order": "second-order MAML replay (vs first-order, the authors' --approx)"}


# ------------------------------------------------------------------------ arithmetic


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    """'mean ± std (n = k)' over seeds; std is the sample std across seeds (training noise)."""
    if len(xs) < 2:
        return f"{xs[0]:.2f} (n = 1)" if xs else "–"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} (n = {len(xs)})"


def signed(xs):
    return ", ".join(f"{x:+.2f}" for x in xs)


def per_seed(seeds, method, flags, shots, sweep=records.Sweep()):
    """{seed: record} of the finished runs of one SEED_RUNS entry at its preset's rounds (a shorter run waits to be
    continued)."""
    want = records.target_rounds(method, flags, sweep.preset)
    found = {seed: seeds.get(run_name(method, flags + seed_flags(seed), shots, sweep.dataset, sweep.preset))
             for seed in SEEDS}
    return {seed: r for seed, r in found.items() if r and r.get("rounds", 0) >= want}


def paired(seeds, a, b, shots, sweep=records.Sweep()):
    """Per-seed differences a - b of test accuracy (same seed: same zoo and tasks), over seeds where both ran."""
    ra, rb = per_seed(seeds, *a, shots, sweep), per_seed(seeds, *b, shots, sweep)
    return [ra[s]["test_acc"] - rb[s]["test_acc"] for s in SEEDS if s in ra and s in rb]


hms = run.format_hms  # h:mm:ss, as free.py's round lines print it


def run_config(r, rounds=None):
    """The Config of a full run of record r's data set, preset and shots (its preset's rounds unless given)."""
    over = dict(free.PRESETS[r["preset"]], dataset=r["dataset"], shots=r["shots"])
    return free.Config(**dict(over, **({"rounds": rounds} if rounds else {})))


def projected_phases(ph, cfg):
    """A full run of `cfg` at a short run's phase times (phase_seconds), in seconds by phase: the teacher zoo (when
    the short run trained it), warm-up rounds; the training rounds' recovery, KD with Eq. (3), replay and the rest
    of a round (memory bank, logging, checkpoints); every meta-validation; the meta-test."""
    validations = sum(settings.is_validation_round(cfg, r) for r in range(1, cfg.rounds + 1))
    train = cfg.rounds - cfg.warmup
    phases = {"teacher zoo": ph["zoo"]} if ph.get("zoo") is not None else {}
    phases["warm-up"] = cfg.warmup * (ph.get("warmup_round") or 0.0)
    if all(ph.get(k) is not None for k in PHASE_NAMES):
        phases.update({name: train * ph[k] for k, name in PHASE_NAMES.items()})
        phases["rest of a round"] = train * (ph["round"] - sum(ph[k] for k in PHASE_NAMES))
    else:  # a record without the per-phase split
        phases["training rounds"] = train * ph["round"]
    phases["meta-validation"] = validations * (ph.get("validation") or 0.0)
    phases["meta-test"] = ph.get("test") or 0.0
    return phases


def projected(ph, cfg):
    """(first run, rerun with the zoo cached): a full run of `cfg` projected from phase times, in seconds."""
    phases = projected_phases(ph, cfg)
    first = sum(phases.values())
    return first, first - phases.get("teacher zoo", 0.0)


SPEEDUP_PHASES = [("zoo", "teacher zoo"), ("warmup_round", "warm-up round"), ("recovery", "recovery"),
                  ("kd", "KD + Eq. (3)"), ("replay", "replay"), ("round", "training round"),
                  ("validation", "validation"), ("test", "meta-test")]


def speedups(a, b):
    """How many times faster record b ran than record a: per phase (SPEEDUP_PHASES keys, None where either lacks
    it), and for the projected full run, first and rerun."""
    pa, pb = phases_of(a), phases_of(b)
    out = {k: pa[k] / pb[k] if pa.get(k) and pb.get(k) else None for k, _ in SPEEDUP_PHASES}
    (fa, ra), (fb, rb) = projected(pa, run_config(a)), projected(pb, run_config(b))
    out.update(first_run=fa / fb, rerun=ra / rb)
    return out


def time_rows(timed):
    """The rows of the time section, {name: record} (stored before the workers comparison: the section itself),
    at equal replay work (equal_work)."""
    return equal_work(timed.get("rows", {}) if "rows" in timed else
                      {k: v for k, v in timed.items() if isinstance(v, dict)})


def equal_work(rows):
    """The rows with every run's replay doing the same work. Replay stops when the train accuracy has not improved
    for `replay_patience` meta-batches, and float summation order (threads, workers) moves that accuracy, so rows of
    one run make different numbers of meta-batches: noise, not an effect of how the run is spread. Each row's
    replay (and round) time becomes its seconds per meta-batch times the run's mean count over its rows; the
    measured phases stay under `measured_phases`. A run any of whose rows lacks the count (or made no meta-batch)
    is left as measured."""
    runs = {}
    for n, r in rows.items():
        runs.setdefault(run_key(r), []).append(n)
    out = dict(rows)
    for names in runs.values():
        counts = [phases_of(rows[n]).get("replay_batches") for n in names]
        if not all(counts):
            continue
        mean = sum(counts) / len(counts)
        for n, count in zip(names, counts):
            ph = dict(phases_of(rows[n]))
            extra = ph["replay"] * (mean / count - 1)
            ph.update(replay=ph["replay"] + extra, round=ph["round"] + extra, replay_batches=mean)
            out[n] = dict(rows[n], phases=ph, measured_phases=phases_of(rows[n]))
    return out


def run_key(r):
    return r["dataset"], r["preset"], r["shots"], r["method"], tuple(r.get("ablations", ()))


def single_process(rows, threads):
    """{run key: (name, record)} of the rows made by 1 process on `threads` torch threads."""
    return {run_key(r): (n, r) for n, r in rows.items()
            if r.get("workers", 1) == 1 and r.get("threads", r.get("torch_threads")) == threads}


def worker_pairs(rows):
    """[(a, b, name_a, name_b)]: rows of the same run made by several workers (b) and by 1 process (a) on as many
    threads as b's workers have in all: the same cores."""
    out = []
    for n, r in rows.items():
        if r.get("workers", 1) > 1:
            twin = single_process(rows, r["workers"] * r.get("threads", r.get("torch_threads", 1))).get(run_key(r))
            if twin:
                out.append((twin[1], r, twin[0], n))
    return out


def ceiling(a, b, rows):
    """What b's workers would gain over a if they split every phase perfectly: the 1 process x 1 thread twin's
    time of each phase shared out over b's threads, against a's: cores * t(a) / t(1 x 1), per phase and
    for the projected run (speedups' keys). Returns (those ratios, the 1 x 1 record), or None when the rows hold no
    1 x 1 twin of the run."""
    one = single_process(rows, 1).get(run_key(b))
    if one is None:
        return None
    cores = b["workers"] * b.get("threads", b.get("torch_threads", 1))
    return {k: cores * v if v else None for k, v in speedups(a, one[1]).items()}, one[1]


def row_label(r):
    return " ".join([r["dataset"], r["preset"], f"{r['shots']}-shot"] + [f"--{a}" for a in r.get("ablations", [])])


def threads_of(r):
    return f"{r.get('workers', 1)} × {r.get('threads', r.get('torch_threads', '?'))}"


def cell(x, fmt="{:.2f}"):
    return fmt.format(x) if x is not None else "–"


# ------------------------------------------------------------------------ tables


def recovery_md(rec):
    rows = rec["rows"]
    med = lambda f: median([f(r) for r in rows])
    lines = [f"{len(rows)} teachers the meta-generator never saw; medians. Meta-generator meta-trained for "
             f"{rec['meta_rounds']} rounds on {rec['meta_teachers']} other teachers (nf = {rec['nf']}, {rec['images']} "
             f"images a task). Student = fresh Conv4 distilled from the recovered images alone ({rec['student_steps']} "
             f"Adam steps), measured on the teacher's real images. Times: {rec['torch_threads']} torch thread(s), the "
             f"benchmark alone on the CPU.", "",
             "| recovery | time (s) | teacher acc. on recovered | student acc. on real images |", "|---|---|---|---|"]
    kinds = [(f"meta-generator, k = {rec['k']}", lambda r: r["meta_k5"]), ("meta-generator, k = 0", lambda r: r["meta_k0"])]
    kinds += [(f"from scratch, {s} steps", (lambda s: lambda r: r["scratch"][str(s)])(s)) for s in CHECKPOINTS]
    for name, f in kinds:
        lines.append(f"| {name} | {med(lambda r: f(r)['seconds']):.2f} | {100 * med(lambda r: f(r)['teacher_acc']):.1f}% "
                     f"| {100 * med(lambda r: f(r)['student_acc']):.1f}% |")
    lines.append("")
    for key, what in [("match_teacher_acc", "teacher accuracy on recovered images"),
                      ("match_student_acc", "student accuracy on real images")]:
        matched = [r for r in rows if r[key]]
        ratios = [r[key]["seconds"] / r["meta_k5"]["seconds"] for r in matched]
        lost = [r for r in rows if not r[key]]
        text = (f"from scratch matched it in a median of {median([r[key]['step'] for r in matched]):.0f} steps on "
                f"{len(matched)}/{len(rows)} teachers; time ratio at equal quality: median {median(ratios):.1f}x"
                if matched else "from scratch never matched it")
        if lost:
            budget = str(rec["scratch_budget"])
            text += (f"; on {len(lost)} teacher(s) it did not match within {budget} steps (> "
                     f"{median([r['scratch'][budget]['seconds'] / r['meta_k5']['seconds'] for r in lost]):.0f}x)")
        lines.append(f"- Equal {what} to the meta-generator's k = {rec['k']}: {text}.")
    return "\n".join(lines) + "\n"


def seed_rows():
    rows = []
    for m, f, _ in SEED_RUNS:
        if (m, f) not in rows:
            rows.append((m, f))
    return rows


def seeds_md(seeds, unfinished=None, missing=None, sweep=records.Sweep()):
    """The accuracy table over seeds (mean ± std), the per-seed table (each run's 95% CI over test tasks), and the
    runs not finished yet."""
    lines = ["A cell is the mean ± std across seeds (training noise); the per-seed table gives each run's test-task "
             "95% CI. '–': not finished at the preset's rounds (the sweep's command runs, resumes or continues it).", "",
             "| method | 1-shot | 5-shot | wall s, mean (1/5-shot) | paper, CIFAR-FS (1/5-shot) |", "|---|---|---|---|---|"]
    for m, f in seed_rows():
        cells, walls = [], []
        for s in (1, 5):
            r = per_seed(seeds, m, f, s, sweep)
            cells.append(spread([x["test_acc"] for x in r.values()]))
            walls.append(f"{statistics.mean(x['wall_seconds'] for x in r.values()):.0f}" if r else "–")
        paper = PAPER_CIFARFS.get(label(m, f))
        lines.append(f"| {label(m, f)} | {cells[0]} | {cells[1]} | {' / '.join(walls)} | "
                     f"{f'{paper[0]} / {paper[1]}' if paper else '–'} |")
    lines += ["", "| run | " + " | ".join(f"seed {s}" for s in SEEDS) + " | processes × threads |",
              "|---|" + "---|" * (len(SEEDS) + 1)]
    for m, f, s in SEED_RUNS:
        r = per_seed(seeds, m, f, s, sweep)
        if r:
            cells = [f"{r[x]['test_acc']:.2f} ± {r[x]['test_ci95']:.2f}" if x in r else "–" for x in SEEDS]
            lines.append(f"| {label(m, f)}, {s}-shot | " + " | ".join(cells) + f" | "
                         f"{'/'.join(sorted({threads_of(x) for x in r.values()}))} |")
    if missing:
        lines += ["", "- Not finished when the report was written (the sweep's commands run, resume or continue them): "
                  + "; ".join(f"`{n}` " + (f"at round {unfinished[n]}" if n in (unfinished or {}) else "not started")
                              for n in missing) + "."]
    return "\n".join(lines) + "\n"


def comparison_lines(seeds, sweep=records.Sweep()):
    """FREE against the baselines per seed, and the share of the gap to data-based MAML FREE closes."""
    lines = []
    for s in (1, 5):
        for other in ("average", "random"):
            d = paired(seeds, ("free", []), (other, []), s, sweep)
            if d:
                lines.append(f"- {s}-shot, FREE − {other}: per seed {signed(d)}; mean {statistics.mean(d):+.2f}, "
                             f"positive on {sum(x > 0 for x in d)}/{len(d)} seeds.")
        gap = gap_closed(seeds, s, sweep)
        if gap:
            lines.append(f"- {s}-shot, share of the gap from random init to data-based MAML that FREE closes: "
                         f"{statistics.mean(gap):.0f}% (mean over {len(gap)} seed{'s' if len(gap) > 1 else ''}).")
    return lines


def gap_closed(seeds, shots, sweep=records.Sweep()):
    """Per seed, 100 (FREE − random) / (data-based MAML − random), over seeds where all three ran."""
    f_, r_, m_ = (per_seed(seeds, m, [], shots, sweep) for m in ("free", "random", "maml"))
    return [100 * (f_[x]["test_acc"] - r_[x]["test_acc"]) / (m_[x]["test_acc"] - r_[x]["test_acc"])
            for x in SEEDS if x in f_ and x in r_ and x in m_]


def component(seeds, flags, sweep=records.Sweep()):
    """FREE − `free FLAGS` per seed, with its mean and std, and both runs' replay accuracy (None if not run)."""
    d = paired(seeds, ("free", []), ("free", flags.split()), 1, sweep)
    if not d:
        return None
    ra, rb = per_seed(seeds, "free", [], 1, sweep), per_seed(seeds, "free", flags.split(), 1, sweep)
    both = [x for x in SEEDS if all(r.get(x, {}).get("replay_acc") is not None for r in (ra, rb))]
    sd = statistics.stdev(d) if len(d) > 1 else None
    return {"d": d, "mean": statistics.mean(d), "std": sd, "outside": sd is not None and abs(statistics.mean(d)) > sd,
            "replay": (statistics.mean(rb[x]["replay_acc"] for x in both), statistics.mean(ra[x]["replay_acc"] for x in both),
                       both) if both else None}


def component_lines(seeds, sweep=records.Sweep()):
    lines = []
    for flags, what in components(sweep.preset).items():
        c = component(seeds, flags, sweep)
        if c:
            scatter = (f", std {c['std']:.2f}, {'outside' if c['outside'] else 'within'} its spread across seeds"
                       if c["std"] is not None else "")
            replay = (f" Replay accuracy on bank tasks, last {REPLAY_WINDOW} rounds, mean over seeds "
                      f"{', '.join(map(str, c['replay'][2]))}: {c['replay'][0]:.3f} against FREE's {c['replay'][1]:.3f}."
                      if c["replay"] else "")
            lines.append(f"- 1-shot, {what}: FREE − `free {flags}` per seed {signed(c['d'])}; mean {c['mean']:+.2f} "
                         f"({'helps' if c['mean'] > 0 else 'does not help'} on the mean{scatter}; positive on "
                         f"{sum(x > 0 for x in c['d'])}/{len(c['d'])} seeds).{replay}")
    return lines


def teachers_line(teachers):
    t = [teachers[k] for k in sorted(teachers)]
    return (f"- Teachers ({t[0]['teachers']} per seed, trained with the crop of A(.)): held-out accuracy "
            f"{100 * statistics.mean(x['held_out'] for x in t):.1f}%; on their own meta-train images "
            f"{100 * statistics.mean(x['own_images'] for x in t):.1f}% as they are, "
            f"{100 * statistics.mean(x['own_images_under_A'] for x in t):.1f}% through A(.) "
            f"(mean over seeds {', '.join(sorted(teachers))}).")


def longest_curves(results, sweep=records.Sweep()):
    """{seed: val_curve} of FREE 1-shot: each seed's longest record, among the `rounds` runs and the sweep's run."""
    best = {}
    own = per_seed(results.get("seeds", {}), "free", [], 1, sweep)
    for r in list(results.get("rounds", {}).values()) + list(own.values()):
        if r.get("val_curve") and r["rounds"] > best.get(r["seed"], {}).get("rounds", -1):
            best[r["seed"]] = r
    return {s: best[s]["val_curve"] for s in sorted(best)}


def by_length(results, sweep=records.Sweep()):
    """{rounds: {seed: record}} of FREE 1-shot runs: the `rounds` runs and the sweep's own runs."""
    out = {}
    for r in sorted(results.get("rounds", {}).values(), key=lambda r: r["rounds"]):
        out.setdefault(r["rounds"], {})[r["seed"]] = r
    for seed, r in per_seed(results.get("seeds", {}), "free", [], 1, sweep).items():
        out.setdefault(r["rounds"], {}).setdefault(seed, r)
    return dict(sorted(out.items()))


def fewest_rounds_ahead(curves, avg, margin):
    """The first validation round at which FREE's meta-validation beats `average`'s by `margin` on every seed."""
    points = sorted({p[0] for c in curves.values() for p in c})
    val = {s: {p[0]: p[1] for p in c} for s, c in curves.items()}
    ahead = [pt for pt in points if all(pt in val.get(s, {}) and avg.get(s, {}).get("best_val_acc") is not None
                                        and val[s][pt] - avg[s]["best_val_acc"] >= margin for s in SEEDS)]
    return ahead[0] if ahead else None


def one_shot_timed(timed):
    """{processes × threads: record} of the time section's FREE 1-shot quick-preset rows on Omniglot."""
    return {threads_of(r): r for r in time_rows(timed or {}).values()
            if run_key(r) == ("omniglot", "quick", 1, "free", ())}


def rounds_md(results):
    """Meta-validation by round of FREE 1-shot continued past the quick preset, against `average` on the same
    validation tasks, and, for each length, the test accuracy of its best meta-validation checkpoint."""
    lengths, curves = by_length(results), longest_curves(results)
    if not results.get("rounds"):
        return ""
    avg = per_seed(results.get("seeds", {}), "average", [], 1)
    replays = {}  # {seed: replay_curve} of each seed's longest run that has one
    for r in sorted(results["rounds"].values(), key=lambda r: r["rounds"]):
        if r.get("replay_curve"):
            replays[r["seed"]] = r["replay_curve"]
    lines = ["Each length continues the longest finished shorter run of its seed (`free.py --resume --rounds R`: the "
             "state an uninterrupted R-round run would have; the sweep's quick-preset runs are among them), one "
             "thread each; other runs shared the cores, so the wall times (every process of a run, summed) overstate "
             f"a run alone. Meta-validation accuracy (the same {free.PRESETS['quick']['val_tasks']} tasks each time) by "
             "round; `average` is the untrained baseline on the same validation tasks. A test row is the best "
             "meta-validation checkpoint of an R-round run, tested once; replay_acc is MAML replay's query accuracy on "
             f"memory-bank tasks (chance {1 / free.Config.way:.1f}), the mean of the {REPLAY_WINDOW} rounds up to R.",
             "", "| | " + " | ".join(f"seed {s}" for s in SEEDS) + " |", "|---|" + "---|" * len(SEEDS)]
    val = {s: {p[0]: p for p in c} for s, c in curves.items()}
    for pt in sorted({p for v in val.values() for p in v}):
        lines.append(f"| FREE val, round {pt} | " + " | ".join(
            f"{val[s][pt][1]:.2f} ± {val[s][pt][2]:.2f}" if pt in val.get(s, {}) else "–" for s in SEEDS) + " |")
    lines.append("| average val | " + " | ".join(cell(avg.get(s, {}).get("best_val_acc")) for s in SEEDS) + " |")
    summary = []
    first = fewest_rounds_ahead(curves, avg, VAL_MARGIN)
    if first:
        summary.append(f"- Meta-validation: the fewest rounds at which FREE beats `average` by {VAL_MARGIN:.0f} points "
                       f"or more on every seed: {first} (the quick preset runs {preset_rounds('quick')}).")
    timed = one_shot_timed(results.get("time"))
    for rounds, runs in lengths.items():
        lines.append(f"| FREE test, {rounds} rounds | " + " | ".join(
            f"{runs[s]['test_acc']:.2f} ± {runs[s]['test_ci95']:.2f}" if s in runs else "–" for s in SEEDS) + " |")
        diff = {s: runs[s]["test_acc"] - avg[s]["test_acc"] for s in SEEDS if s in runs and s in avg}
        lines.append(f"| FREE − average, test, {rounds} rounds | " + " | ".join(
            f"{diff[s]:+.2f}" if s in diff else "–" for s in SEEDS) + " |")
        window = {s: records.replay_window(replays.get(s, []), rounds) for s in SEEDS}
        lines.append(f"| replay_acc, rounds {rounds - REPLAY_WINDOW + 1}-{rounds} | " + " | ".join(
            f"{statistics.mean(window[s]):.3f}" if window[s] else "–" for s in SEEDS) + " |")
        lines.append(f"| wall s, {rounds} rounds | " + " | ".join(
            f"{runs[s]['wall_seconds']:.0f}" if s in runs else "–" for s in SEEDS) + " |")
        if diff:
            d = list(diff.values())
            alone = "; ".join(f"{hms(projected(phases_of(r), run_config(r, rounds))[1])} as {k}"
                              for k, r in timed.items())
            summary.append(f"- {rounds} rounds, FREE − average (test): mean {statistics.mean(d):+.2f}, positive on "
                           f"{sum(x > 0 for x in d)}/{len(d)} seeds; FREE {spread([runs[s]['test_acc'] for s in runs])}."
                           + (f" Alone on this CPU, zoo cached (projected from the time table): {alone}." if alone else ""))
    return "\n".join(lines + [""] + summary) + "\n"


def time_md(timed):
    """The time table: each row's phases (from its metrics.jsonl), wall time and its full run projected (first run,
    zoo included; rerun, zoo cached); the speed-up of workers over one process; each projection by phase."""
    rows = time_rows(timed)
    lines = [f"Each row ran alone, one after another, for its 'rounds timed' (validations at every "
             f"{free.PRESETS['quick']['eval_every']}th round after the warm-up and at the last, then the meta-test); "
             "'teacher zoo' is the zoo phase (teachers trained from an empty cache), '– (cached)' where the run found the "
             "zoo cached. A full run of the row's preset is projected from the phases' times: each phase's time per "
             "round, validation or run, times how often a full run makes it. The times are as measured; the replay "
             "of the projections and of the ratios below is at equal work: each row's seconds per meta-batch times the "
             "mean count of its run's rows (the stopping rule reads a train accuracy that float summation order moves, "
             "so rows of one run make different counts).", "",
             "| run | processes × threads | rounds timed | teacher zoo s | warm-up round s | training round s | "
             "of which recovery / KD + Eq. (3) / replay | replay meta-batches a round, s each | validation s (each) | "
             "meta-test s | wall s | full run projected: first run / rerun, zoo cached |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        ph, cfg = phases_of(r), run_config(r)
        seen = r.get("measured_phases", ph)
        first, rerun = projected(ph, cfg)
        split = " / ".join(cell(seen.get(k)) for k in PHASE_NAMES)
        batches = (f"{seen['replay_batches']:.2f}, {seen['replay'] / seen['replay_batches']:.3f}"
                   if seen.get("replay_batches") else "–")
        trained = f" ({ph['zoo_trained']} trained)" if ph.get("zoo_trained") is not None else ""
        zoo = f"{ph['zoo']:.0f}{trained}" if ph.get("zoo") is not None else "– (cached)"
        lines.append(f"| {row_label(r)} | {threads_of(r)} | {r['rounds']} | {zoo} | {cell(ph.get('warmup_round'))} | "
                     f"{cell(seen.get('round'))} | {split} | {batches} | {cell(ph.get('validation'), '{:.1f}')} | "
                     f"{cell(ph.get('test'), '{:.1f}')} | {r['wall_seconds']:.0f} | {cfg.rounds} rounds: "
                     f"{hms(first) if ph.get('zoo') is not None else '–'} / {hms(rerun)} |")
    pairs = worker_pairs(rows)
    if pairs:
        lines += ["", "How many times faster the workers ran than one process (ratio of the times above; replay and "
                  "training round at equal replay work):", "",
                  "| run | " + " | ".join(name for _, name in SPEEDUP_PHASES) + " | projected first run | projected "
                  "rerun |", "|---|" + "---|" * (len(SPEEDUP_PHASES) + 2)]
        for a, b, _, _ in pairs:
            lines.append(speedup_row(f"{row_label(a)}, {threads_of(b)} against {threads_of(a)}", speedups(a, b)))
            top = ceiling(a, b, rows)
            if top:
                one = top[1]
                lines.append(speedup_row(f"{row_label(a)}, {threads_of(a)} against {threads_of(one)} (a second "
                                         f"thread)", speedups(one, a)))
                lines.append(speedup_row(f"{row_label(a)}, {threads_of(b)} against {threads_of(one)} (a second "
                                         f"worker)", speedups(one, b)))
                cores = b["workers"] * b.get("threads", 1)
                lines.append(speedup_row(f"{row_label(a)}, ceiling of {threads_of(b)} against {threads_of(a)}: "
                                         f"{cores} × ({threads_of(a)} time) / ({threads_of(one)} time)", top[0]))
        if any(ceiling(a, b, rows) for a, b, _, _ in pairs):
            lines += ["", "The ceiling is what the workers would gain if each phase of the 1 process × 1 thread run "
                      "split perfectly between them, with no redundant work and no communication (an ideal that "
                      "measurement noise can exceed a little): a phase that a second torch thread already speeds up "
                      "almost as much as a second worker could (recovery: large convolutions) gains little from "
                      "workers."]
    lines.append("")
    for r in rows.values():
        cfg = run_config(r)
        phases = projected_phases(phases_of(r), cfg)
        total = sum(phases.values())
        shares = ", ".join(f"{k} {v:.0f} s ({100 * v / total:.0f}%)" for k, v in phases.items() if v >= 0.5)
        lines.append(f"- {row_label(r)}, {threads_of(r)}, a {cfg.rounds}-round run projected: {hms(total)} = {shares}.")
    return "\n".join(lines) + "\n"


def speedup_row(label, s):
    return f"| {label} | " + " | ".join(cell(s[k], "{:.2f}x") for k, _ in SPEEDUP_PHASES) + \
        f" | {s['first_run']:.2f}x | {s['rerun']:.2f}x |"


def bank_md(bank):
    seeds = sorted(bank)
    rows = [("teacher A, on its own recovered images (k = 5; mean over teachers)", "own"),
            ("teacher B sharing a class with A, on A's recovered images of it", "other"),
            ("teacher B, on real images of that class", "other_real"),
            ("FREE's best.pt, on bank tasks", "free_on_bank"),
            ("FREE's best.pt, on real meta-train tasks", "free_on_real"),
            ("data-based MAML's best.pt, on bank tasks", "maml_on_bank"),
            ("data-based MAML's best.pt, on real meta-train tasks", "maml_on_real")]
    lines = [f"On the memory bank and meta-generator of each seed's quick-preset FREE 1-shot run (its last.pt). Teacher "
             f"rows: accuracy on the images of one class (chance {100 / free.Config.way:.0f}%), mean over every "
             f"(teacher A, other teacher B, shared class) triple; the bank keeps images under the real class, so a "
             f"class's images come from every teacher that holds it. Model rows: query accuracy after replay's inner "
             f"loop ({free.Config.train_inner_steps} steps) on {BANK_TASKS} 5-way 1-shot tasks drawn as replay draws "
             f"them, from the bank or from real meta-train images.", "",
             "| | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, key in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * bank[s][key]:.1f}%" for s in seeds) + " |")
    lines.append("| teachers holding a bank class (mean) | " +
                 " | ".join(f"{bank[s]['teachers_per_class']:.1f}" for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def kd_diffs(kd):
    """{what: per-seed differences from theta_0} of the KD-only run's body alone, head alone, and both."""
    seeds = sorted(kd)
    return {what: [kd[s][name] - kd[s][KD_ROWS[0][0]] for s in seeds]
            for what, name in (("body alone", "KD-only body, initial head"), ("head alone", "initial body, KD-only run's head"),
                               ("body and head", "KD-only run"))}


def kd_md(kd):
    seeds = sorted(kd)
    lines = [f"Meta-validation accuracy (the {free.PRESETS['quick']['val_tasks']} tasks every run validates on, "
             f"{free.Config.test_inner_steps} adaptation steps) of each seed's initial θ_0 (the start that seed's "
             f"runs share: the `random` baseline), of the `{label(*KD_ONLY)}` run (KD and Eq. (3), no replay) and "
             f"of FREE, both after {preset_rounds('quick')} rounds (last.pt). A row pairs the convolutional body "
             f"(convolutions and BatchNorm) of one with the linear head of another, or with a zeroed head.", "",
             "| body, head | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, _, _ in KD_ROWS:
        lines.append(f"| {name} | " + " | ".join(f"{kd[s][name]:.2f}" for s in seeds) + " |")
    lines.append("")
    names = {"body alone": "KD-only body, initial head", "head alone": "initial body, KD-only run's head",
             "body and head": "KD-only run"}
    for what, d in kd_diffs(kd).items():
        lines.append(f"- The KD-only run's {what} ({names[what]}) − initial θ_0: per seed {signed(d)}; mean "
                     f"{statistics.mean(d):+.2f}.")
    return "\n".join(lines) + "\n"


def gpu_md(g):
    lines = [f"Card: {g['card']} (torch {g['torch']}). Paper preset on CIFAR-FS-shaped synthetic data (32x32x3, "
             f"{free.Config.n_teachers} Conv4 teachers trained briefly: a round's cost depends on their shape, not on "
             f"what they learned), a few rounds timed, then projected to the paper's {free.Config.rounds} rounds with "
             f"every meta-validation and the meta-test ({free.Config.val_tasks} tasks each), the zoo cached.", "",
             "| run | workers | warm-up round s | training round s | recovery / KD + Eq. (3) / replay s | validation s | "
             "meta-test s | peak memory MB | projected paper run |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(g["runs"].items()):
        ph = phases_of(r)
        lines.append(f"| {r['shots']}-shot | {r.get('workers', 1)} | {cell(ph.get('warmup_round'))} | {cell(ph.get('round'))} "
                     f"| {' / '.join(cell(ph.get(k)) for k in PHASE_NAMES)} | {cell(ph.get('validation'), '{:.1f}')} | "
                     f"{cell(ph.get('test'), '{:.1f}')} | {cell(r.get('peak_memory_mb'), '{:.0f}')} | "
                     f"{hms(projected(ph, free.Config(dataset='synthetic', shots=r['shots']))[1])} |")
    return "\n".join(lines) + "\n"


ADAPT_HEADS = {"learned": "meta-learned head", "prototype": "prototype head (Proto-MAML)", "zero": "zero head"}


def adapt_md(a):
    """`free.py adapt` by N, K and starting head: mean over seeds of each seed's meta-test accuracy, and the
    seeds' range."""
    rows, first = a["rows"], a["rows"][0]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"`python free.py adapt` on N-way K-shot tasks of the Omniglot meta-test split ({first['tasks']} tasks "
             f"per setting and seed, the same for every head; {first['steps']} SGD steps, as the meta-test), from "
             f"each seed's FREE 1-shot run (quick preset, best.pt; trained {a['trained_way']}-way). Mean over seeds "
             f"{', '.join(map(str, seeds))} of each seed's accuracy, the seeds' range in brackets; chance is 100/N. "
             f"`adapt`'s default: the meta-learned head at N = {a['trained_way']}, the prototype head elsewhere.", "",
             "| N-way | K-shot | chance | " + " | ".join(ADAPT_HEADS.values()) + " |", "|---|---|---|" + "---|" * len(ADAPT_HEADS)]
    for way, shots in sorted({(r["way"], r["shots"]) for r in rows}):
        cells = []
        for head in ADAPT_HEADS:
            accs = [r["acc"] for r in rows if (r["way"], r["shots"], r["head"]) == (way, shots, head)]
            cells.append(f"{statistics.mean(accs):.1f} [{min(accs):.1f}, {max(accs):.1f}]" if accs else "–")
        lines.append(f"| {way} | {shots} | {100 / way:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def resize_md(r):
    """Recovery through external.fit_input, by the run's image format: medians over the teachers."""
    rows = r["rows"]
    formats = sorted({(x["size"], x["channels"]) for x in rows}, key=lambda f: (f[1], f[0]))
    lines = [f"Teachers of the Omniglot quick zoo ({r['teacher_size']}x{r['teacher_size']}, {r['teacher_channels']} "
             f"channel), exported as `--zoo` programs, serving runs of other image formats: each sees the run's images "
             f"through `external.fit_input` (bilinear resize; colour averaged to grey). Recovery from a fresh "
             f"generator, {r['steps']} evaluations of Eq. (1) at the run's format; the student (a fresh Conv4 at the "
             f"run's format, {r['student_steps']} KD steps on the recovered images alone) is measured on the teacher's "
             f"real images brought to the run's format. Medians over {len({x['teacher'] for x in rows})} teachers.", "",
             "| run's images | teacher acc on recovered | student acc on real images | recovery s |", "|---|---|---|---|"]
    for size, channels in formats:
        mine = [x for x in rows if (x["size"], x["channels"]) == (size, channels)]
        native = " (the teachers' own)" if (size, channels) == (r["teacher_size"], r["teacher_channels"]) else ""
        lines.append(f"| {size}x{size}x{channels}{native} | {median([x['teacher_acc'] for x in mine]) * 100:.1f}% | "
                     f"{median([x['student_acc'] for x in mine]) * 100:.1f}% | {median([x['seconds'] for x in mine]):.1f} |")
    return "\n".join(lines) + "\n"
