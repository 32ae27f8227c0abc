"""experiments/compare.py on the tiny pipeline: a 2-arm x 2-seed DDPO comparison whose table is checked against
the runs' own log files, resume (an unfinished run is resumed, finished runs are not re-run), the
held-out evaluation against sample.py's CLI and the reward itself, and bad input."""
import copy
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

import pytest
import torch

import prompt_sets
from experiments import compare_stats, pooling
from conftest import read_log, run_trainer
from plumbing import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a (red circle) on a (dark background)", "a (blue square)", "an (orange) (triangle)",
           "a (green cross)", "a (purple circle)", "a (yellow square)", "a (red) (triangle)",
           "a (blue) (cross) on a (light background)", "a (grey) (circle)"]
TRAINER_ARGS = ("--num_steps=3 --sample_batch_size=2 --samples_per_prompt=1 --num_batches=1 --train_batch_size=2 --epochs=3 "
                "--explore_frac=0.5 --eval_prompts=2 --eval_seeds=1 --eval_every=1")


def configured(*argv):
    """A fresh compare module with `argv` applied, as `python -m experiments.compare <argv>` would have it, but
    with --compile=off unless `argv` says otherwise (compiling a tiny UNet costs more than its runs)."""
    return configurator.fresh("experiments.compare", ["--compile=off", *argv])


def compare_argv(model, prompt_file, out, *extra):
    return [f"--model={model}", "--reward=jpeg_incompressibility", f"--prompts={prompt_file}", "--seeds=2",
            "--heldout_seeds=2", f"--args={TRAINER_ARGS}", f"--out={out}", *extra]


@pytest.fixture(scope="module")
def nine_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "nine.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def compared(tiny_pipeline_dir, nine_prompts, tmp_path_factory):
    """One comparison, run once for the tests below. Before it, baseline-s0 is started by hand with
    compare's own command and stopped after one epoch, so compare finds one unfinished run."""
    out = tmp_path_factory.mktemp("compare") / "c"
    argv = compare_argv(tiny_pipeline_dir, nine_prompts, out, "--jobs=2", "--metrics=jpeg_compressibility")
    runs = configured(*argv).plan()[1]
    os.makedirs(out)
    # the documented auto hold-out: every 7th prompt (here the 1st and 8th) is held out
    (out / "train_prompts.txt").write_text("".join(p + "\n" for i, p in enumerate(PROMPTS) if i % 7))
    run_trainer("train_ddpo", *runs[0]["argv"], "--stop_after=1")
    assert runs[0]["name"] == "baseline-s0" and len(read_log(runs[0]["dir"])) == 1
    summary = configured(*argv).main()
    return dict(out=out, argv=argv, summary=summary, runs=runs)


@pytest.mark.slow
def test_table_matches_an_independent_computation_from_the_logs(compared):
    out, summary = compared["out"], compared["summary"]
    table = json.loads((out / "table.json").read_text())
    assert table["arms"].keys() == {"baseline", "explore"} == summary["arms"].keys()
    logs = {f"{arm}-s{s}": read_log(out / f"{arm}-s{s}") for arm in ("baseline", "explore") for s in (0, 1)}
    assert all([h["reward_queries"] for h in log] == [2, 4, 6] for log in logs.values())  # same budget
    # the compared curve: evaluation reward (plain sampling) at 0 queries (before training), then
    # after every epoch (--eval_every=1)
    curves = {n: [log[0]["eval_before"]] + [h["eval_reward"] for h in log] for n, log in logs.items()}
    target = statistics.fmean(curves[f"baseline-s{s}"][-1] for s in (0, 1))
    for arm, a in table["arms"].items():
        finals = [curves[f"{arm}-s{s}"][-1] for s in (0, 1)]
        assert a["final_eval"]["mean"] == pytest.approx(sum(finals) / 2)
        assert a["final_eval"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)  # n-1 std of 2
        curve = [(curves[f"{arm}-s0"][e] + curves[f"{arm}-s1"][e]) / 2 for e in range(4)]
        assert a["curve"]["queries"] == [0, 2, 4, 6] and a["curve"]["mean"] == pytest.approx(curve)
        # first crossing of the baseline's final mean, interpolated linearly between evaluations
        i = next((i for i, r in enumerate(curve) if r >= target), None)
        expected = None if i is None else 0.0 if i == 0 else \
            2 * (i - 1) + 2 * (target - curve[i - 1]) / (curve[i] - curve[i - 1])
        assert a["queries_to_baseline"] == (None if expected is None else pytest.approx(expected))
        train = [logs[f"{arm}-s{s}"][-1]["reward_mean"] for s in (0, 1)]
        assert a["final_train"]["mean"] == pytest.approx(sum(train) / 2)
        row = next(l for l in (out / "table.md").read_text().splitlines() if l.startswith(f"| {arm} |"))
        assert f"{a['final_eval']['mean']:.4f} ± {a['final_eval']['std']:.4f}" in row
        assert ("not reached" in row) == (expected is None)
        assert ("untrained model is there" in row) == (expected == 0)
    # the untrained model is the same in every run: one starting point
    assert len({c[0] for c in curves.values()}) == 1
    assert table["arms"]["baseline"]["queries_to_baseline"] is not None  # it reaches its own final value
    # the explore arm explored while epoch < 0.5 * 3 (explore_frac=0.5), the baseline never
    assert [h["explore"] for h in logs["explore-s0"]] == [True, True, False]
    assert not any(h["explore"] for h in logs["baseline-s1"])
    for name in ("reward.png", "heldout.png", "table.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_a_baseline_that_ends_no_higher_than_the_untrained_model_is_reached_at_zero_queries(compared):
    # a real outcome on the shapes world (DDPO without per-prompt statistics ended below the untrained
    # model): every curve starts at or above the target, so "reached at 0 queries" has no ratio
    summary = copy.deepcopy(compared["summary"])
    for a in summary["arms"].values():
        a["queries_to_baseline"] = 0.0
    lines = compare_stats.table_markdown(summary).splitlines()
    rows = [next(l for l in lines if l.startswith(f"| {arm} |")) for arm in ("baseline", "explore")]  # the first table's
    assert all("| 0 (the untrained model is there) |" in r for r in rows)


@pytest.mark.slow
def test_runs_are_trainer_runs_with_the_same_budget_and_held_out_prompts_never_trained_on(compared):
    out = compared["out"]
    configs = {r["name"]: json.loads((out / r["name"] / "config.json").read_text()) for r in compared["runs"]}
    for name, c in configs.items():
        assert c["seed"] == int(name[-1]) and c["explore"] == name.startswith("explore")
        assert c["prompts"] == str(out / "train_prompts.txt") and c["epochs"] == 3 and c["num_steps"] == 3
    trained = prompt_sets.load_prompts(str(out / "train_prompts.txt"))
    held = compared["summary"]["heldout"]
    assert held == [PROMPTS[0], PROMPTS[7]] and not set(held) & set(trained)
    assert sorted(trained + held) == sorted(PROMPTS)


@pytest.mark.slow
def test_an_unfinished_run_was_resumed_and_a_second_invocation_reruns_nothing(compared, capsys):
    out, summary = compared["out"], compared["summary"]
    assert summary["runs_ran"] == 4
    assert "resuming" in (out / "logs" / "baseline-s0.txt").read_text()  # the trainer's own resume
    assert [r["epoch"] for r in read_log(out / "baseline-s0")] == [0, 1, 2]
    files = [out / r["name"] / f for r in compared["runs"] for f in ("log.jsonl", "ckpt.pt", "heldout.pt")]
    before = {f: f.stat().st_mtime_ns for f in files}
    again = configured(*compared["argv"]).main()
    printed = capsys.readouterr().out
    assert again["runs_ran"] == 0 and printed.count("finished earlier, skipped") == 4
    assert "started" not in printed
    assert {f: f.stat().st_mtime_ns for f in files} == before  # nothing retrained, nothing re-evaluated
    assert again["arms"]["explore"]["heldout_reward"] == summary["arms"]["explore"]["heldout_reward"]


@pytest.mark.slow
def test_held_out_evaluation_is_what_sample_cli_draws_scored_by_the_reward(compared, tiny_pipeline_dir):
    import rewards
    out, summary = compared["out"], compared["summary"]
    run = out / "explore-s1"
    cached = torch.load(run / "heldout.pt", weights_only=False)
    assert cached["images"].shape[:2] == (2, 2)  # 2 held-out prompts x 2 seeds
    # the held-out reward is the reward's mean over those images (JPEG sizes need uint8 pixels anyway)
    r = rewards.load("jpeg_incompressibility")(cached["images"].flatten(0, 1).float() / 255, summary["heldout"] * 2)
    assert cached["reward"] == pytest.approx(r.mean().item(), rel=1e-6)
    assert summary["arms"]["explore"]["heldout_reward"]["per_seed"][1] == cached["reward"]
    # --metrics scores the same images with another reward: here minus the same JPEG sizes
    assert cached["metrics"] == {"jpeg_compressibility": pytest.approx(-cached["reward"], rel=1e-6)}
    per_seed = summary["arms"]["explore"]["heldout_metrics"]["jpeg_compressibility"]["per_seed"]
    assert per_seed[1] == cached["metrics"]["jpeg_compressibility"]
    assert "held-out jpeg_compressibility" in (out / "table.md").read_text()
    # the same images as sample.py's CLI with the run's LoRA and sampling settings
    cfg = json.loads((run / "config.json").read_text())
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--model={tiny_pipeline_dir}",
                          f"--lora={run / 'lora'}", f"--prompts={out / 'heldout_prompts.txt'}", "--num_seeds=2",
                          f"--guidance={cfg['guidance']}", f"--steps={cfg['num_steps']}", f"--eta={cfg['eta']}",
                          f"--out={out / 'cli.png'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cli_diversity = float(re.search(r"plain: ([0-9.]+)", res.stdout).group(1))
    assert cached["diversity"] == pytest.approx(cli_diversity, abs=1e-4)


@pytest.mark.slow
def test_alignprop_compare(tiny_pipeline_dir, nine_prompts, tmp_path):
    out = tmp_path / "c"
    summary = configured(f"--model={tiny_pipeline_dir}", "--trainer=alignprop", "--reward=shapes_appeal",
                         f"--prompts={nine_prompts}", "--seeds=1", "--jobs=2", "--heldout_seeds=2", f"--out={out}",
                         "--args=--num_steps=2 --batch_size=2 --steps_per_epoch=1 --epochs=1 --eval_prompts=1 "
                         "--eval_seeds=1").main()
    for arm in ("baseline", "explore"):
        log = read_log(out / f"{arm}-s0")
        assert json.loads((out / f"{arm}-s0" / "config.json").read_text())["explore"] == (arm == "explore")
        assert summary["arms"][arm]["final_eval"] == dict(mean=log[-1]["eval_reward"], std=0.0,
                                                         per_seed=[log[-1]["eval_reward"]])
    assert summary["reward_queries"] == 2 and (out / "reward.png").exists()


@pytest.mark.slow
def test_prdp_compare_and_versus_ddpos(compared, tiny_pipeline_dir, nine_prompts, tmp_path):
    out = tmp_path / "c"
    # 3 steps, as DDPO's runs there: the held-out images are sampled the same way
    argv = [f"--model={tiny_pipeline_dir}", "--trainer=prdp", "--reward=jpeg_incompressibility",
            f"--prompts={nine_prompts}", "--seeds=2", "--jobs=2", "--heldout_seeds=2", f"--out={out}",
            "--baseline_only", "--args=--num_steps=3 --prompts_per_epoch=1 --images_per_prompt=2 "
            "--sample_batch_size=2 --train_batch_size=2 --epochs=1 --eval_prompts=1 --eval_seeds=1"]
    summary = configured(*argv, f"--versus={compared['out']}").main()
    assert list(summary["arms"]) == ["baseline"] and not (out / "explore-s0").exists()  # --baseline_only
    logs = [read_log(out / f"baseline-s{s}") for s in range(2)]
    assert not json.loads((out / "baseline-s0" / "config.json").read_text())["explore"]
    assert summary["arms"]["baseline"]["final_eval"]["per_seed"] == [log[-1]["eval_reward"] for log in logs]
    # --versus: the final evaluation reward against DDPO's baseline, from both folders' own logs
    ddpo = [read_log(compared["out"] / f"baseline-s{s}")[-1]["eval_reward"] for s in range(2)]
    d = summary["versus"]["arms"]["baseline"]["final_eval"]
    assert list(summary["versus"]["arms"]) == list(summary["versus"]["curves"]) == ["baseline"]
    assert d == compare_stats.unpaired_difference([log[-1]["eval_reward"] for log in logs], ddpo)
    assert d["mean"] == pytest.approx(statistics.fmean(log[-1]["eval_reward"] for log in logs) - statistics.fmean(ddpo))
    assert summary["versus"]["curves"]["baseline"]["curve"] == compared["summary"]["arms"]["baseline"]["curve"]
    assert summary["versus"]["trainer"] == "ddpo" and summary["versus"]["reward_queries"] == compared["summary"]["reward_queries"]
    assert summary["reward_queries"] == 2 and (out / "reward.png").exists()
    assert f"**prdp** minus **ddpo** (`{compared['out']}`)" in (out / "table.md").read_text()
    # the same comparison against DDPO's table from another world (same name, other weights: its manifest
    # hash differs), or from before the world was recorded: refused before any training or rewriting
    before = (out / "table.json").read_text()
    for change, message in ((lambda t: t.update(world="0" * 64), r"was run with another world"),
                            (lambda t: t.pop("world"), r"predates the record of its model's weights")):
        other = tmp_path / f"other-{len(message)}"
        other.mkdir()
        table = json.loads((compared["out"] / "table.json").read_text())
        change(table)
        (other / "table.json").write_text(json.dumps(table))
        with pytest.raises(SystemExit, match=rf"^error: --versus=.*{message}"):
            configured(*argv, f"--versus={other}").main()
    assert (out / "table.json").read_text() == before
    assert summary["world"] == compared["summary"]["world"] == pooling.world_id(compared["summary"]["model"])


def test_auto_metrics_are_the_shapes_worlds_ground_truth_scores_other_than_the_reward():
    compare = configured()  # --metrics=auto
    assert compare.metric_names(dict(model="shapes", reward="shapes_aesthetic")) == ["shapes_success", "shapes_correct", "shapes_appeal"]
    assert compare.metric_names(dict(model="shapes", reward="shapes_appeal")) == ["shapes_success", "shapes_correct"]
    assert compare.metric_names(dict(model="some/sd-model", reward="aesthetic")) == []


def test_time_left_is_the_mean_run_time_times_the_runs_left_over_the_jobs():
    # 2 of 10 runs done in 600 s and 620 s, 2 at a time: 8 x 610 / 2 = 2440 s; 2 of 82: 80 x 610 / 2 = 24400 s
    compare = configured()
    assert compare.time_left([600, 620], 10, 2) == "41 min"
    assert compare.time_left([600, 620], 82, 2) == "6.8 h"
    assert compare.time_left([599], 10, 1) == "90 min" and compare.time_left([601], 10, 1) == "1.5 h"


def test_queries_to_reach_interpolates_the_first_crossing():
    assert compare_stats.queries_to_reach([10, 20, 30], [0.0, 1.0, 3.0], 2.0) == pytest.approx(25.0)
    assert compare_stats.queries_to_reach([10, 20, 30], [0.0, 2.5, 1.0], 2.0) == pytest.approx(18.0)  # first, not last
    assert compare_stats.queries_to_reach([10, 20], [5.0, 6.0], 2.0) == 10.0
    assert compare_stats.queries_to_reach([10, 20], [0.0, 1.0], 2.0) is None


def test_ablation_plans_five_arms_differing_only_in_the_exploration_switches(tiny_pipeline_dir, nine_prompts, tmp_path):
    folder, runs, *_ = configured(*compare_argv(tiny_pipeline_dir, nine_prompts, tmp_path / "c", "--ablation")).plan()
    assert [r["name"] for r in runs] == [f"{a}-s{s}" for a in ("baseline", "explore", "cfg_only", "weights_only", "w_low0")
                                         for s in (0, 1)]
    switches = {r["arm"]: (r["config"]["explore"], r["config"]["explore_cfg"], r["config"]["explore_weights"],
                           r["config"]["w_low"]) for r in runs}
    assert switches == {"baseline": (False, True, True, 1.0), "explore": (True, True, True, 1.0),
                        "cfg_only": (True, True, False, 1.0), "weights_only": (True, False, True, 1.0),
                        "w_low0": (True, True, True, 0.0)}
    switched = ("explore", "explore_cfg", "explore_weights", "w_low", "seed", "out")
    strip = lambda c: {k: v for k, v in c.items() if k not in switched}
    assert all(strip(r["config"]) == strip(runs[0]["config"]) for r in runs)
    assert not os.path.exists(folder)  # planning writes nothing


def test_baseline_only_plans_the_baseline_alone_and_refuses_exploring_options(tiny_pipeline_dir, nine_prompts, tmp_path):
    argv = compare_argv(tiny_pipeline_dir, nine_prompts, tmp_path / "c", "--baseline_only")
    assert [r["name"] for r in configured(*argv).plan()[1]] == ["baseline-s0", "baseline-s1"]
    for extra in ("--ablation", "--explore_args=--t_thres=900"):
        with pytest.raises(SystemExit, match="^error: --baseline_only runs no exploring arm"):
            configured(*argv, extra).main()
    assert not (tmp_path / "c").exists()


def test_explore_args_change_only_the_exploring_arms_and_keep_the_baseline_runs(tiny_pipeline_dir, nine_prompts, tmp_path):
    argv = compare_argv(tiny_pipeline_dir, nine_prompts, tmp_path / "c", "--ablation")
    plain = {r["name"]: r for r in configured(*argv).plan()[1]}
    varied = {r["name"]: r for r in configured(*argv, "--explore_args=--t_thres=900 --w_low=2").plan()[1]}
    tag = "-t_thres900-w_low2"
    assert list(varied) == [f"baseline-s{s}" for s in (0, 1)] + [f"{a}{tag}-s{s}" for a in (
        "explore", "cfg_only", "weights_only", "w_low0") for s in (0, 1)]
    for name, r in varied.items():
        if name.startswith("baseline"):  # the same runs, in the same folders: reused, not re-run
            assert r["dir"] == plain[name]["dir"] and r["config"] == plain[name]["config"]
        else:
            before = plain[name.replace(tag, "")]["config"]
            changed = {k for k in r["config"] if r["config"][k] != before[k]}
            assert changed == {"out", "t_thres", "w_low"} and (r["config"]["t_thres"], r["config"]["w_low"]) == (900, 2.0)
            assert shlex.join(r["argv"]).endswith("--t_thres=900 --w_low=2")  # after the arm's own flags: they win


@pytest.mark.parametrize("extra, message", [
    (["--trainer=sgd"], "--trainer must be one of ddpo, alignprop"),
    (["--seeds=0"], "--seeds"),
    (["--args=--seed=3"], "--args must not set --seed"),
    (["--args=--no-explore"], "--args must not set --no_explore"),
    (["--explore_args=--seed=1"], "--explore_args must not set --seed"),
    (["--args=--epoch=2"], "did you mean --epochs"),
    (["--args=--lr=fast"], "--lr expects a number"),
    (["--heldout=no_such_set"], "unknown prompt set"),
    (["--reward=beauty"], "unknown reward 'beauty'"),
    (["--model=no_such_folder"], "no diffusers folder at 'no_such_folder'"),
    (["--args=--eta=1.5"], "in --args (train_ddpo.py): --eta must be in (0, 1], got 1.5"),
    (["--heldout_seeds=1"], "--heldout_seeds must be >= 2"),
    (["--metrics=shapes_corect"], "--metrics: unknown reward 'shapes_corect'"),
])
def test_bad_input_is_a_one_line_error_with_nothing_written(tiny_pipeline_dir, nine_prompts, tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        configured(*compare_argv(tiny_pipeline_dir, nine_prompts, tmp_path / "c"), *extra).main()
    assert str(e.value).startswith("error:") and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()


def test_versus_refuses_a_folder_without_a_table_or_of_another_experiment(tiny_pipeline_dir, nine_prompts, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    argv = compare_argv(tiny_pipeline_dir, nine_prompts, tmp_path / "c", f"--versus={other}")
    with pytest.raises(SystemExit, match=r"^error: --versus=.* holds no table.json; run that comparison"):
        configured(*argv).main()
    held = [PROMPTS[0], PROMPTS[7]]  # the auto hold-out of the nine prompts
    same = dict(model=str(tiny_pipeline_dir), reward="jpeg_incompressibility", prompts=nine_prompts, heldout=held,
                heldout_sampling=dict(guidance=5.0, num_steps=3, eta=1.0),  # the runs' own settings: TRAINER_ARGS
                world=None)  # a plain diffusers folder: no shapes world's manifest
    for change, message in ((dict(reward="jpeg_compressibility"), r"was run with another reward \('jpeg_compressibility'"),
                            (dict(heldout_sampling=dict(guidance=5.0, num_steps=3, eta=0.0)), "was run with another heldout_sampling"),
                            (dict(heldout_sampling=None), "predates the record of how its held-out images were sampled")):
        table = {k: v for k, v in dict(same, **change).items() if v is not None or k == "world"}
        (other / "table.json").write_text(json.dumps(table))
        with pytest.raises(SystemExit, match=rf"^error: --versus=.*{message}"):
            configured(*argv).main()
    assert not (tmp_path / "c").exists()


def test_a_single_prompt_cannot_be_held_out(tiny_pipeline_dir, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a (red circle)\n")
    with pytest.raises(SystemExit, match="needs at least 2.*--heldout"):
        configured(*compare_argv(tiny_pipeline_dir, one, tmp_path / "c")).main()


@pytest.mark.slow
def test_a_failing_run_names_the_run_and_the_trainer_error(tiny_pipeline_dir, nine_prompts, tmp_path):
    # more DDIM steps than the model has timesteps: only the trainer, with the model loaded, can tell
    argv = compare_argv(tiny_pipeline_dir, nine_prompts, tmp_path / "c", "--seeds=1", "--jobs=1",
                        f"--args={TRAINER_ARGS} --num_steps=2000")
    with pytest.raises(SystemExit) as e:
        configured(*argv).main()
    assert re.match(r"error: run baseline-s\d failed \(exit code 1\): error: --num_steps must be <= the model's "
                    r"1000 training timesteps, got 2000", str(e.value))
    assert "re-run the same command" in str(e.value)
    assert not (tmp_path / "c" / "baseline-s0" / "log.jsonl").exists()


def test_paired_difference_against_a_hand_computation():
    # differences 0.1, 0.3, 0.2: mean 0.2, sample std 0.1, t(2 df) = 4.303 -> half-width 4.303 * 0.1 / sqrt(3)
    p = compare_stats.paired_difference([1.1, 2.3, 3.2], [1.0, 2.0, 3.0])
    half = 4.303 * 0.1 / 3 ** 0.5
    assert p["mean"] == pytest.approx(0.2) and (p["low"], p["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert p["verdict"] == "no difference" and p["n"] == 3  # 0.2 - 0.248 < 0
    assert compare_stats.paired_difference([1.2, 2.2, 3.2, 4.21], [1.0, 2.0, 3.0, 4.0])["verdict"] == "helps"
    assert compare_stats.paired_difference([0.8, 1.79, 2.8], [1.0, 2.0, 3.0])["verdict"] == "hurts"
    # unpaired, these two arms overlap by a wide margin; paired, the same seeds show a consistent gain
    assert compare_stats.paired_difference([5.0, 7.0, 9.0, 11.0], [4.9, 6.8, 8.95, 10.9])["verdict"] == "helps"


def t_cdf(x, df, steps=20000):
    """Student's t distribution function by Simpson's rule on its density (independent of the tables)."""
    import math
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda u: c * (1 + u * u / df) ** (-(df + 1) / 2)
    h = x / steps
    return 0.5 + h / 3 * sum((1 if i in (0, steps) else 4 if i % 2 else 2) * f(i * h) for i in range(steps + 1))


def test_t_quantile_tables_against_the_t_distribution():
    for df in range(1, 41):
        assert t_cdf(compare_stats.T_975[df - 1], df) == pytest.approx(0.975, abs=2e-4), df
        assert t_cdf(compare_stats.T_80[df - 1], df) == pytest.approx(0.80, abs=2e-4), df


def test_smallest_detectable_effect_and_seeds_needed_against_hand_computations():
    # differences 0.1, 0.3, 0.2: sd 0.1, se 0.1 / sqrt(3); 2 df: (4.303 + 1.061) se
    p = compare_stats.paired_difference([1.1, 2.3, 3.2], [1.0, 2.0, 3.0])
    assert p["detectable"] == pytest.approx((4.303 + 1.061) * 0.1 / 3 ** 0.5)
    # sd 0.727 (the 5 seeds' DDPO explore - baseline), half-width 0.3: 25 seeds give 2.064 * 0.727 / 5 = 0.3001,
    # 26 give 2.060 * 0.727 / sqrt(26) = 0.2937
    assert compare_stats.seeds_for(0.727, 0.3) == 26
    assert compare_stats.seeds_for(0.1, 1.0) == 2 and compare_stats.seeds_for(10.0, 0.1) is None


def test_queries_interval_bootstraps_seeds_in_pairs():
    queries = [0, 10, 20, 30]
    base = [[0.0, 1.0, 2.0, 3.0], [0.0, 1.5, 2.5, 3.5], [0.0, 0.5, 1.5, 2.5]]
    same = compare_stats.queries_interval(queries, base, base)
    assert (same["low"], same["high"]) == (1.0, 1.0)  # an arm identical to the baseline: 1x in every resample
    faster = [[0.0, 3.0, 4.0, 5.0], [0.0, 3.5, 4.5, 5.5], [0.0, 2.5, 3.5, 4.5]]  # +2 from the first evaluation on
    f = compare_stats.queries_interval(queries, faster, base)
    assert f["high"] < 1.0 and f["low"] > 0
    never = compare_stats.queries_interval(queries, [[0.0, 0.0, 0.0, 0.0]] * 3, base)
    assert never["low"] == never["high"] == float("inf")


def test_unpaired_difference_against_a_hand_computation():
    # a: mean 2, variance 1; b: mean 6, variance 20/3. Squared standard errors 1/3 and 5/3, sum 2;
    # Welch-Satterthwaite df = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 4.08 -> 4, t = 2.776
    d = compare_stats.unpaired_difference([1.0, 2.0, 3.0], [3.0, 5.0, 7.0, 9.0])
    half = 2.776 * 2 ** 0.5
    assert d["mean"] == pytest.approx(-4.0) and (d["low"], d["high"]) == pytest.approx((-4 - half, -4 + half))
    assert d["verdict"] == "lower" and d["n"] == (3, 4)  # -4 + 3.93 < 0
    assert compare_stats.unpaired_difference([3.0, 5.0, 7.0, 9.0], [1.0, 2.0, 3.0])["verdict"] == "higher"
    assert compare_stats.unpaired_difference([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])["verdict"] == "no difference"
    # one run on a side: no interval
    assert compare_stats.unpaired_difference([1.0], [2.0, 3.0])["high"] == float("inf")


def test_arms_picks_arms_and_refuses_unknown_ones(tiny_pipeline_dir, nine_prompts, tmp_path):
    argv = compare_argv(tiny_pipeline_dir, nine_prompts, tmp_path / "c")
    planned = configured(*argv, "--arms=w_low0,baseline,explore").plan()[1]
    assert [r["name"] for r in planned] == [f"{a}-s{s}" for a in ("baseline", "explore", "w_low0") for s in (0, 1)]
    assert {r["arm"]: r["config"]["w_low"] for r in planned} == {"baseline": 1.0, "explore": 1.0, "w_low0": 0.0}
    for extra, message in (("--arms=baseline,explor", "--arms: unknown arm 'explor'"),
                           ("--arms=baseline --ablation", "--arms names the arms itself")):
        with pytest.raises(SystemExit, match=f"^error: {message}"):
            configured(*argv, *extra.split()).main()
    assert not (tmp_path / "c").exists()


def test_a_folder_of_another_world_is_refused_and_pooling_checks_world_prompts_and_options(
        tiny_pipeline_dir, nine_prompts, tmp_path):
    """Runs of other weights never mix into a folder's table; --pool copies in only finished runs of the same
    world, training prompts and options, and refuses a folder that differs in any of them."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    argv = compare_argv(tiny_pipeline_dir, nine_prompts, mine, "--arms=baseline")
    mine.mkdir()
    (mine / "world.json").write_text(json.dumps(dict(model="x", world="0" * 64)))
    with pytest.raises(SystemExit, match=r"^error: .*mine holds runs of other weights \(world 0000.*--out=<new folder>"):
        configured(*argv).main()
    (mine / "world.json").unlink()
    mine.rmdir()
    # a finished run elsewhere: a copy of what this comparison would run, made there by the trainer itself
    mod = configured(*compare_argv(tiny_pipeline_dir, nine_prompts, theirs, "--arms=baseline", "--seeds=1"))
    folder, planned, train_list, train_prompts, *_ = mod.plan()
    theirs.mkdir()
    (theirs / "train_prompts.txt").write_text("".join(p + "\n" for p in train_list))
    (theirs / "world.json").write_text(json.dumps(dict(model=str(tiny_pipeline_dir), world=None)))
    run_trainer("train_ddpo", *planned[0]["argv"])
    pooled = configured(*argv, f"--pool={theirs}").plan()[-1]
    assert [(r["name"], d) for r, d in pooled] == [("baseline-s0", str(theirs / "baseline-s0"))]  # s1: not there
    for change, message in (
            (lambda: (theirs / "world.json").write_text(json.dumps(dict(world="f" * 64))), "was trained on other weights"),
            (lambda: (theirs / "train_prompts.txt").write_text("a (red circle)\n"), "trained on other prompts"),
            (lambda: (theirs / "baseline-s0" / "config.json").write_text(json.dumps(
                dict(planned[0]["config"], lr=1.0))), r"run baseline-s0 was run with other options \(lr: 1.0")):
        saved = {p: p.read_text() for p in (theirs / "world.json", theirs / "train_prompts.txt",
                                            theirs / "baseline-s0" / "config.json")}
        change()
        with pytest.raises(SystemExit, match=f"^error: --pool=.*{message}"):
            configured(*argv, f"--pool={theirs}").main()
        assert not mine.exists()
        for p, text in saved.items():
            p.write_text(text)
    mod = configured(*argv, f"--pool={theirs}")
    pooling.copy_pooled(mod.plan()[-1])
    copied = mine / "baseline-s0"
    assert read_log(copied) == read_log(theirs / "baseline-s0") and not (copied / "ckpt.pt").exists()
    assert json.loads((copied / "config.json").read_text())["out"] == str(mine / "baseline-s0")
    assert mod.plan()[-1] == []  # finished here now: nothing more to pool
