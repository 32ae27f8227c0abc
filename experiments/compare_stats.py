"""The comparison's numbers, table and figure (experiments/compare.py runs the experiment, this summarises
it): evaluation curves over seeds, the reward queries each arm needs to reach the baseline's final
reward, each arm's paired difference from the baseline with its 95% t-interval (and, against another
comparison's arms, the unpaired difference with Welch's interval), a markdown table and the
reward-curve figure.
"""
import json
import os
import random
import statistics

from plumbing import runs
def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]



def mean_std(values):
    """Mean and sample standard deviation (n-1) over seeds; std 0 for a single seed."""
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                per_seed=list(values))


def queries_to_reach(queries, curve, target):
    """The reward queries at which `curve` first reaches `target`, linearly interpolated between the
    last epoch below it and the first at or above it; None if it never does."""
    for i, (q, r) in enumerate(zip(queries, curve)):
        if r >= target:
            if i == 0:
                return float(q)
            q0, r0 = queries[i - 1], curve[i - 1]
            return q0 + (target - r0) / (r - r0) * (q - q0)
    return None


def eval_curve(log):
    """(reward queries, evaluation reward) of one run: the untrained model at 0 queries, then every
    evaluation. Evaluations sample plainly (constant guidance, unweighted prompts, fixed noise), so
    both arms are measured the same way; the training samples are not comparable across arms, as
    the explore arm draws them with a low guidance scale on purpose."""
    points = [(0, log[0]["eval_before"])] if "eval_before" in log[0] else []
    return points + [(h["reward_queries"], h["eval_reward"]) for h in log if "eval_reward" in h]


def band(per_point):
    """Mean and std over seeds at each point: [[seed values] per point] -> dict of two lists."""
    return dict(mean=[statistics.fmean(v) for v in per_point], std=[mean_std(v)["std"] for v in per_point])


# Student's t quantiles for 1..40 degrees of freedom (above 40: the 40-df value, slightly wide),
# from standard tables; tests/test_compare.py checks them against the t density integrated numerically.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
         2.040, 2.037, 2.035, 2.032, 2.030, 2.028, 2.026, 2.024, 2.023, 2.021]  # 97.5%: two-sided 95% intervals
T_80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
        0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854,
        0.853, 0.853, 0.853, 0.852, 0.852, 0.852, 0.851, 0.851, 0.851, 0.851]  # 80%: power 0.8


def t_quantile(table, df):
    return table[min(max(int(df), 1), len(table)) - 1]


def difference(mean, se, df, n, words=("helps", "hurts")):
    """A mean difference with standard error `se` on `df` degrees of freedom: its 95% t-interval,
    what the interval supports (the first word when it lies above 0, the second when below, else
    "no difference"), and the smallest true difference this design detects with 80% power at the 5%
    level, (t_0.975 + t_0.8) se: an effect smaller than it may well pass as "no difference"."""
    half = t_quantile(T_975, df) * se
    verdict = words[0] if mean - half > 0 else words[1] if mean + half < 0 else "no difference"
    return dict(mean=mean, low=mean - half, high=mean + half, n=n, verdict=verdict,
                detectable=(t_quantile(T_975, df) + t_quantile(T_80, df)) * se)


def mean_interval(values):
    """The mean of `values` and the half-width of its 95% t-interval (inf for a single value)."""
    return statistics.fmean(values), t_quantile(T_975, len(values) - 1) * standard_error(values)


def standard_error(values):
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("inf")


def paired_difference(arm_values, base_values):
    """Arm minus baseline, seed by seed (the same seed draws the same prompts and noise in both: a
    paired design), with the mean difference's 95% t-interval and what it supports: "helps" or
    "hurts" when the interval excludes 0, else "no difference"."""
    d = [a - b for a, b in zip(arm_values, base_values)]
    return difference(statistics.fmean(d), standard_error(d), len(d) - 1, len(d))


def unpaired_difference(a_values, b_values):
    """Mean of a minus mean of b over independent runs (two trainers: no seed pairs their runs),
    with Welch's 95% t-interval (Welch-Satterthwaite degrees of freedom, rounded down, so the
    interval is slightly wide) and "higher", "lower" or "no difference"."""
    na, nb = len(a_values), len(b_values)
    mean = statistics.fmean(a_values) - statistics.fmean(b_values)
    if min(na, nb) < 2:
        return difference(mean, float("inf"), 1, (na, nb), ("higher", "lower"))
    # squared standard errors of the two means; both 0: no spread, a zero-width interval
    va, vb = statistics.variance(a_values) / na, statistics.variance(b_values) / nb
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)) if va + vb > 0 else na + nb - 2
    return difference(mean, (va + vb) ** 0.5, df, (na, nb), ("higher", "lower"))


def seeds_for(sd, half_width, most=40):
    """The fewest paired seeds whose 95% t-interval of the mean difference has half-width at most
    `half_width`, when the differences spread with standard deviation `sd` (None: more than `most`)."""
    return next((n for n in range(2, most + 1) if t_quantile(T_975, n - 1) * sd / n ** 0.5 <= half_width), None)


def queries_interval(queries, arm_curves, base_curves, draws=2000, seed=0):
    """The reward queries an arm needs to reach the baseline's final evaluation reward, as a ratio to
    the queries the baseline needs (both on the mean curve over seeds, as the table's column), with a
    95% percentile bootstrap interval over seeds: seeds are resampled with replacement, the same
    seeds for both arms (the design pairs them); a resample whose arm never reaches counts as
    infinite. Curves: [seed][evaluation point], on the evaluation points' `queries`."""
    rng, n, ratios = random.Random(seed), len(arm_curves), []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        mean = lambda curves: [statistics.fmean(curves[i][j] for i in idx) for j in range(len(queries))]
        base = mean(base_curves)
        q_base, q = queries_to_reach(queries, base, base[-1]), queries_to_reach(queries, mean(arm_curves), base[-1])
        if q_base:  # 0: the untrained model is already there, no ratio
            ratios.append(float("inf") if q is None else q / q_base)
    if not ratios:
        return None
    ratios.sort()
    return dict(low=ratios[int(0.025 * len(ratios))], high=ratios[int(0.975 * len(ratios)) - 1], draws=len(ratios))


def summarise(run_list, evals, trained_evals):
    arms, seed_curves = {}, {}
    for arm in dict.fromkeys(r["arm"] for r in run_list):
        logs = [read_log(r["dir"]) for r in run_list if r["arm"] == arm]
        queries = [h["reward_queries"] for h in logs[0]]
        curves = [eval_curve(log) for log in logs]
        if any([h["reward_queries"] for h in log] != queries for log in logs) or \
                any([q for q, _ in c] != [q for q, _ in curves[0]] for c in curves):
            raise SystemExit(f"error: the runs of arm {arm} logged different reward-query counts; "
                             "their folders hold runs of different lengths")
        seed_curves[arm] = [[r for _, r in c] for c in curves]
        names = [r["name"] for r in run_list if r["arm"] == arm]
        arms[arm] = dict(
            flags=next(r["flags"] for r in run_list if r["arm"] == arm),
            curve=dict(queries=[q for q, _ in curves[0]], **band([[c[i][1] for c in curves] for i in range(len(curves[0]))])),
            train_curve=dict(queries=queries, **band([[log[e]["reward_mean"] for log in logs] for e in range(len(queries))])),
            # the last point whose samples were drawn exploring (None: never explored)
            explore_until=max((h["reward_queries"] for h in logs[0] if h["explore"]), default=None),
            final_eval=mean_std([c[-1][1] for c in curves]),
            final_train=mean_std([log[-1]["reward_mean"] for log in logs]),
            heldout_reward=mean_std([evals[n]["reward"] for n in names]),
            heldout_metrics={m: mean_std([evals[n]["metrics"][m] for n in names]) for m in evals["pretrained"]["metrics"]},
            heldout_diversity=mean_std([evals[n]["diversity"] for n in names]),
            trained_metrics={m: mean_std([trained_evals[n]["metrics"][m] for n in names])
                             for m in trained_evals["pretrained"]["metrics"]},
            train_seconds=sum(h["seconds"] for log in logs for h in log))
    target = arms["baseline"]["final_eval"]["mean"]
    base = arms["baseline"]
    for name, a in arms.items():
        a["queries_to_baseline"] = queries_to_reach(a["curve"]["queries"], a["curve"]["mean"], target)
        if a is not base:  # seed s of this arm against seed s of the baseline
            a["queries_ratio_interval"] = queries_interval(a["curve"]["queries"], seed_curves[name],
                                                           seed_curves["baseline"])
            pair = lambda key, sub=None: paired_difference(*[(x[key][sub] if sub else x[key])["per_seed"] for x in (a, base)])
            a["paired"] = dict(final_eval=pair("final_eval"), heldout_reward=pair("heldout_reward"),
                               **{f"trained {m}": pair("trained_metrics", m) for m in a["trained_metrics"]},
                               **{f"held-out {m}": pair("heldout_metrics", m) for m in a["heldout_metrics"]})
    return arms


def arm_differences(summary, other):
    """Each arm of this comparison against the same arm of `other` (another comparison's
    table.json, e.g. another trainer's on the same reward and prompts): the final numbers' unpaired
    differences, this minus other. Arms that only one of them has are left out."""
    result = {}
    for name, a in summary["arms"].items():
        b = other["arms"].get(name)
        if b is None:
            continue
        cols = dict(final_eval=("final_eval", None), heldout_reward=("heldout_reward", None),
                    **{f"trained {m}": ("trained_metrics", m) for m in a["trained_metrics"] if m in b["trained_metrics"]},
                    **{f"held-out {m}": ("heldout_metrics", m) for m in a["heldout_metrics"] if m in b["heldout_metrics"]})
        pick = lambda x, key, sub: (x[key][sub] if sub else x[key])["per_seed"]
        result[name] = {col: unpaired_difference(pick(a, key, sub), pick(b, key, sub)) for col, (key, sub) in cols.items()}
    return result


def difference_rows(by_arm):
    """Markdown table rows of differences: one row per arm, one column per measure, and last the
    smallest final-eval difference the design detects (80% power, 5% level)."""
    cols = list(next(iter(by_arm.values())))
    return (["| arm | " + " | ".join(col.replace("_", " ") for col in cols) + " | final eval: smallest detectable |",
             "|---|" + "---|" * (len(cols) + 1)]
            + [f"| {name} | " + " | ".join(f"{d[k]['mean']:+.4f} [{d[k]['low']:+.4f}, {d[k]['high']:+.4f}] {d[k]['verdict']}"
                                           for k in cols) + f" | ±{d[cols[0]]['detectable']:.4f} |" for name, d in by_arm.items()])


def table_markdown(summary):
    arms, c = summary["arms"], summary
    base_q = arms["baseline"]["queries_to_baseline"]
    pm = lambda m: f"{m['mean']:.4f} ± {m['std']:.4f}" if m else "–"
    curve = arms["baseline"]["curve"]  # its first point is the untrained model (the same in every run)
    before = f"{curve['mean'][0]:.4f}" if curve["queries"] and curve["queries"][0] == 0 else "–"
    lines = [f"**{c['trainer']}** on `{c['model']}`, reward `{c['reward']}`, prompts `{c['prompts']}`; "
             f"{c['seeds']} seed{'s' if c['seeds'] > 1 else ''} per arm (mean ± std over seeds); every run: {c['reward_queries']} reward queries. "
             f"Trainer options: `{c['args'] or '(defaults)'}`.", "",
             "| arm | final eval reward (training prompts, plain sampling) | reward queries to reach the baseline's "
             "final eval reward | final training-sample reward | held-out reward | "
             + "".join(f"held-out {m} | " for m in c["pretrained"]["metrics"]) + "held-out diversity |",
             "|---|---|---|---|---|---|" + "---|" * len(c["pretrained"]["metrics"]),
             f"| pretrained | {before} | – | – | {c['pretrained']['reward']:.4f} | "
             + "".join(f"{v:.4f} | " for v in c["pretrained"]["metrics"].values()) + f"{c['pretrained']['diversity']:.4f} |"]
    for name, a in arms.items():
        q = a["queries_to_baseline"]
        ratio = f" ({q / base_q:.2f}x)" if q is not None and base_q else ""
        # 0: the baseline ended no higher than the untrained model, which already "reaches" it
        b = a.get("queries_ratio_interval") if q != 0 and c["seeds"] > 1 else None  # the bootstrap over seeds
        q = ("not reached" if q is None else "0 (the untrained model is there)" if q == 0
             else (f"{q:.0f}" if q >= 100 else f"{q:.1f}") + ratio)
        if b:
            end = lambda x: "not reached" if x == float("inf") else f"{x:.2f}x"
            q += f"; 95% bootstrap [{end(b['low'])}, {end(b['high'])}]"
        lines.append(f"| {name} | {pm(a['final_eval'])} | {q} | {pm(a['final_train'])} | "
                     f"{pm(a['heldout_reward'])} | " + "".join(f"{pm(v)} | " for v in a["heldout_metrics"].values())
                     + f"{pm(a['heldout_diversity'])} |")
    paired = {name: a["paired"] for name, a in arms.items() if "paired" in a}
    if paired and c["seeds"] > 1:
        lines += ["", "Each arm minus the baseline, seed by seed (the same seed draws the same prompts and initial noise "
                  "in every arm): mean difference [95% t-interval over seeds], and what the interval supports.", "",
                  *difference_rows(paired)]
    if c.get("versus", {}).get("arms"):
        v = c["versus"]
        lines += ["", f"**{c['trainer']}** minus **{v['trainer']}** (`{v['folder']}`), arm by arm, over independent runs "
                  f"({c['seeds']} and {v['seeds']} seeds; reward queries per run {c['reward_queries']} and "
                  f"{v['reward_queries']}): difference of the means [Welch's 95% t-interval], and what it supports.", "",
                  *difference_rows(v["arms"])]
    if c["pretrained_trained"]["metrics"]:
        lines += ["", "Ground truth on training prompts (" + f"{len(c['trained'])} of them, {c['heldout_seeds']} seeds each), "
                  "pretrained: " + ", ".join(f"{m} {v:.4f}" for m, v in c["pretrained_trained"]["metrics"].items())
                  + "; after training: " + "; ".join(f"{name} " + ", ".join(f"{m} {pm(v)}" for m, v in a["trained_metrics"].items())
                                                     for name, a in arms.items()) + "."]
    lines += ["", f"Held-out prompts ({len(c['heldout'])}, {c['heldout_seeds']} seeds each): "
              + "; ".join(f"`{p}`" for p in c["heldout"]) + ".",
              f"Training time: {c['train_seconds'] / 60:.1f} min in all (sum of the runs' epochs); "
              f"this invocation: {c['wall_seconds'] / 60:.1f} min wall."]
    return "\n".join(lines) + "\n"


def plot_curves(summary, path):
    """Left: evaluation reward (plain sampling) against reward queries, the comparison; right: the
    reward of the training samples, which the explore arm draws differently while it explores. With
    --versus, the other comparison's arms too (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    other = summary.get("versus", {})  # --versus: the other comparison's curves, dashed
    curves = ([(name, a, "-") for name, a in summary["arms"].items()]
              + [(f"{other['trainer']} {name}", a, "--") for name, a in other.get("curves", {}).items()])
    for ax, key, ylabel in ((axes[0], "curve", "evaluation reward (plain sampling)"),
                            (axes[1], "train_curve", "reward of the training samples")):
        for name, a, style in curves:
            q, m, s = a[key]["queries"], a[key]["mean"], a[key]["std"]
            line, = ax.plot(q, m, ("o" if key == "curve" else "") + style, ms=3, label=name)
            ax.fill_between(q, [x - d for x, d in zip(m, s)], [x + d for x, d in zip(m, s)], color=line.get_color(), alpha=0.2)
        if key == "curve":
            ax.axhline(summary["arms"]["baseline"]["final_eval"]["mean"], color="gray", ls="--", lw=0.8,
                       label="baseline's final eval reward")
        for q in {a["explore_until"] for a in summary["arms"].values() if a["explore_until"]}:
            ax.axvline(q, color="gray", ls=":", lw=0.8, label="exploration ends")
        ax.set_xlabel("reward queries")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"{summary['trainer']}, {summary['reward']}: mean ± std over {summary['seeds']} seeds", fontsize=10)
    fig.tight_layout()
    runs.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
