"""DDPO: the PPO objective and advantages against hand computations, on-policy ratios, resume and
multi-process equivalence, and bad input, on a tiny random SD-shaped pipeline."""
import os
import re
import subprocess
import sys

import pytest
import torch

import train_ddpo
from conftest import lora_weights, read_log, record_sampling, run_trainer, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(tiny_pipeline_dir, prompt_file, out, *extra):
    return [f"--model={tiny_pipeline_dir}", "--reward=jpeg_incompressibility", f"--prompts={prompt_file}",
            "--num_steps=4", "--sample_batch_size=4", "--samples_per_prompt=2", "--num_batches=2", "--train_batch_size=4",
            "--epochs=2", "--eval_every=100", "--eval_prompts=2", "--eval_seeds=2", f"--out={out}", *extra]


def test_ppo_loss_against_hand_computation():
    logp = torch.tensor([0.0, 0.5, -0.5, 0.1, 0.0])
    old = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3])
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0, 0.5])
    loss, kl, clipfrac, ratio = train_ddpo.ppo_loss(logp, old, adv, clip_range=0.2)  # both branches of the max
    expected, clipped = [], 0
    for lp, o, a in zip(logp.tolist(), old.tolist(), adv.tolist()):
        r = torch.tensor(lp - o).exp().item()
        rc = min(max(r, 0.8), 1.2)
        expected.append(max(-a * r, -a * rc))  # pessimistic bound: the larger of the two losses
        clipped += abs(r - 1) > 0.2
    assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-6)
    assert clipfrac.item() == pytest.approx(clipped / 5)
    assert kl.item() == pytest.approx(0.5 * sum((lp - o) ** 2 for lp, o in zip(logp.tolist(), old.tolist())) / 5)
    # gradient flows only through the unclipped branch: a clipped, improving sample gets none
    logp.requires_grad_(True)
    train_ddpo.ppo_loss(logp, old, adv, clip_range=0.2)[0].backward()
    assert logp.grad[1] == 0 and logp.grad[0] != 0


def test_per_prompt_advantages_against_hand_computation():
    from collections import defaultdict
    buffers = defaultdict(list)
    prompts = ["a", "a", "a", "b"]
    r = torch.tensor([1.0, 2.0, 3.0, 10.0])
    adv = train_ddpo.per_prompt_advantages(prompts, r, buffers, stat_buffer=4, stat_min_count=3)
    # "a" has 3 rewards (enough): its own mean 2 and population std sqrt(2/3); "b" has 1: the batch's
    assert adv[:3].tolist() == pytest.approx([-(1.5 ** 0.5), 0.0, 1.5 ** 0.5], abs=1e-5)
    batch_std = (sum((x - 4.0) ** 2 for x in (1.0, 2.0, 3.0, 10.0)) / 4) ** 0.5  # mean 4, population std
    assert adv[3].item() == pytest.approx(6.0 / batch_std, rel=1e-5)
    # the buffer keeps only the last 4 rewards of each prompt
    adv = train_ddpo.per_prompt_advantages(["a", "a"], torch.tensor([4.0, 5.0]), buffers, stat_buffer=4, stat_min_count=3)
    assert buffers["a"] == [2.0, 3.0, 4.0, 5.0]
    assert adv.tolist() == pytest.approx([(4 - 3.5) / 1.25 ** 0.5, (5 - 3.5) / 1.25 ** 0.5], rel=1e-5)


class ReferenceTracker:
    """ddpo-pytorch's per-prompt stat tracker (ddpo_pytorch/stat_tracking.py, as TRL's DDPOTrainer
    used it), re-written here in numpy from its description: a deque of the last buffer_size rewards
    per prompt, extended with the batch's rewards first; below min_count the whole batch's
    np.mean / np.std, else the prompt's own; std + 1e-6."""

    def __init__(self, buffer_size, min_count):
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts, rewards):
        from collections import deque
        import numpy as np
        prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for p in np.unique(prompts):
            own = rewards[prompts == p]
            self.stats.setdefault(p, deque(maxlen=self.buffer_size)).extend(own)
            pool = rewards if len(self.stats[p]) < self.min_count else np.array(self.stats[p])
            advantages[prompts == p] = (own - np.mean(pool)) / (np.std(pool) + 1e-6)
        return advantages


def test_per_prompt_advantages_match_ddpo_pytorchs_tracker():
    from collections import defaultdict
    g = torch.Generator().manual_seed(0)
    ref, buffers = ReferenceTracker(buffer_size=8, min_count=5), defaultdict(list)
    for epoch in range(6):  # buffers fill, overflow, and some prompts stay below min_count
        idx = torch.randint(4, (12,), generator=g)
        prompts = [f"prompt {i}" for i in idx.tolist()]
        r = torch.randn(12, generator=g, dtype=torch.float64) * (1 + epoch)
        ours = train_ddpo.per_prompt_advantages(prompts, r, buffers, stat_buffer=8, stat_min_count=5)
        assert ours.tolist() == pytest.approx(ref.update(prompts, r.numpy()).tolist(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("explore", [False, True])
def test_ratio_is_one_on_the_first_inner_step(tiny_pipeline_dir, prompt_file, tmp_path, explore):
    flags = ["--explore", "--t_thres=500"] if explore else []
    run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, tmp_path / "run", "--epochs=1", *flags))
    (rec,) = read_log(tmp_path / "run")
    assert rec["explore"] is explore
    assert rec["ratio_dev"] < 1e-5  # the recomputed log-prob is the sampling one
    assert rec["reward_queries"] == 8 and rec["grad_norm"] > 0


def test_run_folder_contents_and_lora_loads_in_diffusers(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, out, "--eval_every=2"))
    for name in ("config.json", "log.jsonl", "reward.png", "ckpt.pt", "eval_0001.png"):
        assert (out / name).exists(), name
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and [r["reward_queries"] for r in log] == [8, 16]
    assert "eval_reward" in log[1] and "eval_reward" not in log[0]
    assert "eval_before" in log[0] and "eval_before" not in log[1] and (out / "eval_base.png").exists()
    assert any(v.abs().sum() > 0 for k, v in lora_weights(out).items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_pipeline_dir, prompt_file, tmp_path):
    args = small(tiny_pipeline_dir, prompt_file, tmp_path / "a", "--epochs=3")
    run_trainer("train_ddpo", *args)
    interrupted = small(tiny_pipeline_dir, prompt_file, tmp_path / "b", "--epochs=3")
    run_trainer("train_ddpo", *interrupted, "--stop_after=1")
    assert len(read_log(tmp_path / "b")) == 1
    run_trainer("train_ddpo", *interrupted, "--stop_after=1")
    run_trainer("train_ddpo", *interrupted)  # the same command, re-run
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "a") [-1]["reward_mean"] == read_log(tmp_path / "b")[-1]["reward_mean"]


@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_kl_to_pretrained_is_the_kl_of_the_two_gaussian_steps(family):
    # KL(N(m, s^2) || N(m_ref, s^2)) per latent dimension, averaged: torch.distributions' KL, with the means
    # and the std taken from DDIMScheduler.step (diffusers) for DDIM, and from the flow step's samples
    # at noise 0 and 1 for the flow model
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from torch.distributions import Normal, kl_divergence
    import sampling
    g = torch.Generator().manual_seed(0)
    x_t, out, out_ref = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    eta = 0.8
    if family == "ddim":
        sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            set_alpha_to_one=False)
        sch.set_timesteps(10)
        t = sch.timesteps[3]
        zero = torch.zeros_like(x_t)
        mean = sch.step(out, t, x_t, eta=eta, variance_noise=zero).prev_sample
        mean_ref = sch.step(out_ref, t, x_t, eta=eta, variance_noise=zero).prev_sample
        std = eta * sch._get_variance(t, t - 100).sqrt()
    else:
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sch.set_timesteps(10)
        t = sch.timesteps[3]
        step = lambda o, z: sampling.flow_step(sch, o, t, x_t, eta, noise=torch.full_like(x_t, z))[0]
        mean, mean_ref, std = step(out, 0.0), step(out_ref, 0.0), (step(out, 1.0) - step(out, 0.0))[0, 0, 0, 0]
    expected = kl_divergence(Normal(mean, std), Normal(mean_ref, std)).mean(dim=(1, 2, 3))
    got = train_ddpo.kl_to_pretrained(sch, out, out_ref, t, x_t, eta)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert (got > 0).all()
    assert train_ddpo.kl_to_pretrained(sch, out, out, t, x_t, eta).abs().max() < 1e-6


@pytest.mark.slow
def test_kl_penalty_to_the_pretrained_model(tiny_pipeline_dir, prompt_file, tmp_path):
    # off by default (nothing logged); on, it is logged, 0 while the LoRA is still zero, then > 0, and it
    # changes the update
    run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, tmp_path / "off"))
    run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, tmp_path / "on", "--kl_beta=100"))
    off, on = read_log(tmp_path / "off"), read_log(tmp_path / "on")
    assert "kl_ref" not in off[0] and on[0]["kl_ref"] >= 0 and on[1]["kl_ref"] > 0
    assert off[0]["reward_mean"] == on[0]["reward_mean"]  # the same first samples
    a, b = lora_weights(tmp_path / "off"), lora_weights(tmp_path / "on")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(tiny_pipeline_dir, prompt_file, tmp_path):
    """A hard kill at an arbitrary moment leaves a resumable folder (atomic checkpoint writes)."""
    args = small(tiny_pipeline_dir, prompt_file, tmp_path / "a", "--epochs=3")
    run_trainer("train_ddpo", *args)
    cmd = [sys.executable, os.path.join(ROOT, "train_ddpo.py"),
           *small(tiny_pipeline_dir, prompt_file, tmp_path / "b", "--epochs=3")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "b" / "ckpt.pt"
    import time
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()  # SIGKILL, right after the first checkpoint appeared (possibly mid-write of the next)
    proc.wait()
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tiny_pipeline_dir, prompt_file, tmp_path):
    # one process: 2 sampling batches, one optimizer step over both; two processes: 1 batch each,
    # gradients averaged across processes. Same samples, same advantages, the same steps of each chain
    # trained (the default trains half of them, chosen by the sample's place in the global batch), same update.
    common = small(tiny_pipeline_dir, prompt_file, tmp_path / "one", "--epochs=1")
    run_trainer("train_ddpo", *common, "--num_batches=2", "--grad_accum=2")
    two = small(tiny_pipeline_dir, prompt_file, tmp_path / "two", "--epochs=1", "--num_batches=1", "--grad_accum=1")
    torchrun("train_ddpo.py", *two)
    a, b = lora_weights(tmp_path / "one"), lora_weights(tmp_path / "two")
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # Adam amplifies reduction-order noise in near-zero gradients
    assert read_log(tmp_path / "one")[0]["reward_mean"] == pytest.approx(read_log(tmp_path / "two")[0]["reward_mean"])


# train_ddpo.py under a process group timeout of 10 s, with each evaluation batch 4 s slower than it is
# (3 batches: 12 s an evaluation, longer than the timeout, as an SDXL recipe's on a slower card is longer
# than NCCL's 10 minutes)
SLOW_EVALUATION = """
import datetime, runpy, sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
from plumbing import evaluation

init_process_group = dist.init_process_group
dist.init_process_group = lambda *a, **k: init_process_group(*a, **k, timeout=datetime.timedelta(seconds=10))
evaluate = evaluation.evaluate

def slow_evaluate(pipe, reward_fn, *a, **k):
    def slow_reward(images, prompts):
        time.sleep(4)
        return reward_fn(images, prompts)
    return evaluate(pipe, slow_reward, *a, **k)

evaluation.evaluate = slow_evaluate
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_an_evaluation_longer_than_the_process_group_timeout(tiny_pipeline_dir, prompt_file, tmp_path):
    """Every rank evaluates its share of the images, so no rank waits in a collective while another
    evaluates alone: an evaluation longer than the timeout does not end the run (rank 0 alone made the
    other rank wait 12 s in the epoch's first collective, and gloo gave up after 10). Its numbers are one
    process's: the same micro-batches of the same noise (3 batches: rank 0 takes two, rank 1 one)."""
    wrapper = tmp_path / "slow_evaluation.py"
    wrapper.write_text(SLOW_EVALUATION.format(root=ROOT, script=os.path.join(ROOT, "train_ddpo.py")))
    evaluation = ["--epochs=1", "--eval_prompts=3", "--eval_seeds=1", "--eval_batch_size=1"]
    torchrun(str(wrapper), *small(tiny_pipeline_dir, prompt_file, tmp_path / "two", *evaluation,
                                  "--num_batches=1", "--grad_accum=1"))
    run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, tmp_path / "one", *evaluation,
                                     "--num_batches=2", "--grad_accum=2"))
    one, two = read_log(tmp_path / "one")[0], read_log(tmp_path / "two")[0]
    assert two["eval_before"] == pytest.approx(one["eval_before"], rel=1e-6)
    assert two["eval_reward"] == pytest.approx(one["eval_reward"], rel=1e-4)  # after an update: as the LoRA weights match
    assert (tmp_path / "two" / "eval_0000.png").exists()


@pytest.mark.parametrize("flags, message", [
    (["--reward=beauty"], "beauty"),
    (["--prompts=no_such_set"], "unknown prompt set"),
    (["--train_batch_size=3"], "must be a multiple"),
    (["--samples_per_prompt=3"], "must divide --sample_batch_size"),
    (["--eta=0"], "--eta must be in (0, 1]"),
    (["--timestep_fraction=1.5"], "timestep_fraction"),
    (["--timestep_fraction=0"], "timestep_fraction"),
])
def test_bad_input_is_a_clear_error_with_nothing_written(tiny_pipeline_dir, prompt_file, tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, out), *flags)
    assert message in str(e.value) and str(e.value).startswith("error:")
    assert not out.exists()


@pytest.mark.slow
def test_unknown_model_and_empty_prompt_file(prompt_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="no prompts"):
        run_trainer("train_ddpo", f"--prompts={empty}", f"--out={tmp_path / 'r'}")
    nested = tmp_path / "nested.txt"
    nested.write_text("a ((red) circle)\n")
    with pytest.raises(SystemExit, match="error: nested parentheses"):
        run_trainer("train_ddpo", f"--prompts={nested}", f"--out={tmp_path / 'r'}")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train_ddpo.py"), "--model=no-such-org/no-such-model",
                          f"--prompts={prompt_file}", "--reward=jpeg_compressibility", f"--out={tmp_path / 'r'}"],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=60)
    assert res.returncode != 0 and "no-such-org/no-such-model" in res.stderr
    assert not (tmp_path / "r").exists()


def nan_reward_when(monkeypatch, bad):
    """rewards.load returns jpeg_incompressibility, except that its n-th call (from 1) returns NaN
    for the first image whenever bad(n): no real reward returns NaN on demand, so wrap a real one."""
    import rewards
    real_load, calls = rewards.load, []

    def load(name, **kw):
        fn = real_load(name, **kw)

        def wrapped(images, prompts):
            calls.append(1)
            r = fn(images, prompts)
            return torch.cat([torch.full((1,), float("nan")), r[1:]]) if bad(len(calls)) else r
        wrapped.differentiable = fn.differentiable
        return wrapped
    monkeypatch.setattr(rewards, "load", load)


def test_a_nan_reward_skips_that_epochs_update_and_the_run_goes_on(tiny_pipeline_dir, prompt_file, tmp_path,
                                                                   monkeypatch, capsys):
    # reward calls: 1 = the evaluation before training, 2-3 = epoch 0's two batches, 4-5 = epoch 1's
    nan_reward_when(monkeypatch, lambda n: n == 2)
    out = tmp_path / "run"
    run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, out))
    log = read_log(out)
    assert [r["skipped_updates"] for r in log] == [2, 0]  # epoch 0: both of its updates; epoch 1 trains
    assert log[0]["reward_queries"] == 8 and log[1]["grad_norm"] > 0
    err = capsys.readouterr().err
    assert re.search(r"warning: reward jpeg_incompressibility returned nan in epoch 0, on prompt 'a", err)
    weights = lora_weights(out)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # epoch 1 did train


def test_a_reward_that_stays_nan_stops_the_run_and_the_last_good_checkpoint_resumes(tiny_pipeline_dir, prompt_file,
                                                                                     tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = small(tiny_pipeline_dir, prompt_file, out, "--epochs=6")
    run_trainer("train_ddpo", *args, "--stop_after=2")  # two good epochs
    good = torch.load(out / "ckpt.pt", weights_only=True)["lora"]
    nan_reward_when(monkeypatch, lambda n: True)  # from now on, every reward call
    with pytest.raises(SystemExit) as e:
        run_trainer("train_ddpo", *args)
    msg = str(e.value)
    assert "\n" not in msg and re.match(r"error: reward jpeg_incompressibility returned nan in epoch 4, on prompt 'a"
                                        r".*; 3 updates in a row skipped, so the run stops", msg)
    assert capsys.readouterr().err.count("update skipped") == 2  # epochs 2 and 3 warned, epoch 4 stopped
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["epoch"] == 3 and [h["skipped_updates"] for h in ck["history"]] == [0, 0, 2, 2]
    assert ck["lora"].keys() == good.keys()
    assert all(torch.equal(ck["lora"][k], good[k]) for k in good if "lora_" in k)  # no update since the good epochs
    monkeypatch.undo()  # the reward is fixed: the same command resumes at epoch 4 and finishes
    run_trainer("train_ddpo", *args)
    assert [r["epoch"] for r in read_log(out)] == list(range(6))
    assert all(torch.isfinite(v).all() for v in lora_weights(out).values())


def test_changed_config_in_an_existing_run_folder_is_refused(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, out, "--epochs=1"))
    with pytest.raises(SystemExit, match=r"different config \(lr: 0.003 -> 0.01\).*resume.*--out"):
        run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, out, "--epochs=1"), "--lr=0.01")


def test_buffers_start_afresh_when_exploration_ends(tiny_pipeline_dir, prompt_file, tmp_path):
    """Epoch 0 explores, epoch 1 samples plainly: the per-prompt buffers after epoch 1 hold only its
    own 8 rewards (exploring samples would be a stale, lower baseline); without exploring, 16."""
    for explore, expected in ((True, 8), (False, 16)):
        out = tmp_path / str(explore)
        run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, out, "--explore_frac=0.5",
                                         *(["--explore"] if explore else [])))
        ck = torch.load(out / "ckpt.pt", weights_only=False)
        assert [h["explore"] for h in ck["history"]] == [explore, False]
        assert sum(len(b) for b in ck["buffers"].values()) == expected


def test_same_seed_same_prompts_and_initial_noise_exploring_or_not(tiny_pipeline_dir, prompt_file, tmp_path,
                                                                    monkeypatch):
    """Common random numbers: the prompt choice and the initial noise have streams of their own, so
    drawing prompt weights while exploring shifts neither."""
    runs = {}
    for explore in (False, True):
        seen = record_sampling(monkeypatch)
        run_trainer("train_ddpo", *small(tiny_pipeline_dir, prompt_file, tmp_path / str(explore), "--epochs=1",
                                         *(["--explore"] if explore else [])))
        runs[explore] = seen
        monkeypatch.undo()
    assert runs[False]["prompts"] == runs[True]["prompts"] and len(runs[True]["noise"]) == 4  # 2 batches, 2 evaluations
    assert all(torch.equal(a, b) for a, b in zip(runs[False]["noise"], runs[True]["noise"]))
