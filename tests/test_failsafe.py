"""The fail-safe: a NaN or infinite sample, reward or gradient skips its update (and a few in a row
stop the run with one line), a checkpoint with a non-finite weight is never written, checkpoints
are written durably and read with the safe loader, and a resume refuses a changed process count.
DDPO's NaN-reward tests are in test_ddpo.py."""
import os
import re

import pytest
import torch

import lora
import sampling
from plumbing import runs
from conftest import lora_weights, read_log, run_trainer


def ddpo_args(model, prompt_file, out, *extra):
    return [f"--model={model}", "--reward=jpeg_incompressibility", f"--prompts={prompt_file}", "--num_steps=4",
            "--sample_batch_size=4", "--samples_per_prompt=2", "--num_batches=2", "--train_batch_size=4",
            "--epochs=2", "--eval_every=100", "--eval_prompts=2", "--eval_seeds=2", f"--out={out}", *extra]


def alignprop_args(model, prompt_file, out, *extra):
    return [f"--model={model}", "--reward=shapes_appeal", f"--prompts={prompt_file}", "--num_steps=4",
            "--batch_size=2", "--steps_per_epoch=2", "--epochs=2", "--eval_every=100", "--eval_prompts=2",
            "--eval_seeds=2", f"--out={out}", *extra]


def finite(weights):
    return all(torch.isfinite(v).all() for v in weights.values())


# ---- DDPO: what a NaN reward check alone would miss ------------------------------------------------

def test_ddpo_catches_a_nan_chain_that_the_jpeg_reward_scores_finite(tiny_pipeline_dir, prompt_file, tmp_path,
                                                                      monkeypatch, capsys):
    import rewards
    nan_image = torch.full((1, 3, 16, 16), float("nan"))
    assert torch.isfinite(rewards.load("jpeg_incompressibility")(nan_image, ["x"])).all()  # the hazard
    real, calls = sampling.rollout, []

    def rollout(*a, **k):  # the second rollout (epoch 0's first batch) goes NaN from its third step
        traj = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            traj.latents[0, 3:] = float("nan")
            traj.images[0] = float("nan")
        return traj
    monkeypatch.setattr(sampling, "rollout", rollout)
    out = tmp_path / "run"
    run_trainer("train_ddpo", *ddpo_args(tiny_pipeline_dir, prompt_file, out))
    assert [r["skipped_updates"] for r in read_log(out)] == [2, 0]
    assert "warning: sampling gave non-finite latents or log-probs (eta 1, guidance 5) in epoch 0" in capsys.readouterr().err
    assert finite(lora_weights(out))


def test_ddpo_skips_an_update_whose_gradient_is_not_finite(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch,
                                                           capsys):
    real, calls = sampling.ddim_step, []

    def ddim_step(*a, prev_sample=None, **k):  # one training step's recomputed log-prob is NaN
        x, log_prob = real(*a, prev_sample=prev_sample, **k)
        if prev_sample is not None:
            calls.append(1)
            if len(calls) == 1:
                log_prob = log_prob * float("nan")
        return x, log_prob
    monkeypatch.setattr(sampling, "ddim_step", ddim_step)
    out = tmp_path / "run"
    run_trainer("train_ddpo", *ddpo_args(tiny_pipeline_dir, prompt_file, out))
    log = read_log(out)
    assert [r["skipped_updates"] for r in log] == [1, 0]  # the first of epoch 0's two updates
    assert log[0]["grad_norm"] > 0  # the second one went through
    assert re.search(r"warning: non-finite loss or gradient \(gradient norm nan\) in epoch 0, on prompts? '",
                     capsys.readouterr().err)
    assert finite(lora_weights(out))


# ---- AlignProp --------------------------------------------------------------------------------------

def brightness_with(monkeypatch, bad):
    """rewards.load gives a differentiable brightness reward whose n-th call (from 1) is NaN when bad(n)."""
    import rewards
    calls = []

    def load(name, **kw):
        def fn(images, prompts):
            calls.append(1)
            r = images.mean(dim=(1, 2, 3))
            return r * float("nan") if bad(len(calls)) else r
        fn.differentiable = True
        return fn
    monkeypatch.setattr(rewards, "load", load)


def test_alignprop_skips_a_nan_reward_and_goes_on(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch, capsys):
    brightness_with(monkeypatch, lambda n: n == 3)  # 1: evaluation before training; 2, 3: epoch 0's updates
    out = tmp_path / "run"
    run_trainer("train_alignprop", *alignprop_args(tiny_pipeline_dir, prompt_file, out))
    log = read_log(out)
    assert [r["skipped_updates"] for r in log] == [1, 0] and [r["reward_queries"] for r in log] == [4, 8]
    assert re.search(r"warning: reward shapes_appeal returned nan in epoch 0, on prompt '", capsys.readouterr().err)
    assert finite(lora_weights(out))


def test_alignprop_stops_after_max_skips_and_resumes_from_the_last_good_checkpoint(tiny_pipeline_dir, prompt_file,
                                                                                  tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = alignprop_args(tiny_pipeline_dir, prompt_file, out, "--epochs=4", "--max_skips=2")
    brightness_with(monkeypatch, lambda n: False)
    run_trainer("train_alignprop", *args, "--stop_after=1")
    good = torch.load(out / "ckpt.pt", weights_only=True)
    brightness_with(monkeypatch, lambda n: True)
    with pytest.raises(SystemExit) as e:
        run_trainer("train_alignprop", *args)
    assert re.match(r"error: reward shapes_appeal returned nan in epoch 1, on prompt '.*'; 2 updates in a row "
                    r"skipped, so the run stops \(--max_skips=2\); .*ckpt.pt keeps the last good state", str(e.value))
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["epoch"] == 0 and all(torch.equal(ck["lora"][k], good["lora"][k]) for k in good["lora"] if "lora_" in k)
    brightness_with(monkeypatch, lambda n: False)
    run_trainer("train_alignprop", *args)
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2, 3] and finite(lora_weights(out))


def test_alignprop_skips_a_finite_reward_with_a_nan_gradient(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch):
    import rewards

    def load(name, **kw):  # sqrt at 0: the value is finite, its gradient 0 * inf = NaN
        fn = lambda images, prompts: images.mean(dim=(1, 2, 3)) + (images * 0).sqrt().mean(dim=(1, 2, 3))
        fn.differentiable = True
        return fn
    monkeypatch.setattr(rewards, "load", load)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"error: non-finite gradient \(norm nan\) in epoch 1, on prompt"):
        run_trainer("train_alignprop", *alignprop_args(tiny_pipeline_dir, prompt_file, out, "--max_skips=3"))
    assert read_log(out)[0]["skipped_updates"] == 2 and not (out / "lora").exists()


# ---- DRaFT-LV: K is what ran -----------------------------------------------------------------------

def test_draft_lv_honours_checkpointing_and_logs_k_one(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch):
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    run_trainer("train_alignprop", *alignprop_args(tiny_pipeline_dir, prompt_file, out, "--epochs=1", "--draft_lv=2",
                                                    "--checkpointing=true"))
    (rec,) = read_log(out)
    assert rec["k"] == [1, 1] and len(calls) == 2 * 2  # 2 updates x 2 re-noised copies, each checkpointed
    with pytest.raises(SystemExit, match=r"--draft_lv=2 .* cannot take --truncation=all"):
        run_trainer("train_alignprop", *alignprop_args(tiny_pipeline_dir, prompt_file, tmp_path / "b", "--draft_lv=2",
                                                        "--truncation=all"))
    assert not (tmp_path / "b").exists()


# ---- resume ----------------------------------------------------------------------------------------

def test_resume_with_another_process_count_is_refused(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    args = ddpo_args(tiny_pipeline_dir, prompt_file, out)
    run_trainer("train_ddpo", *args, "--stop_after=1")
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["world_size"] == 1
    runs.save_checkpoint(out, dict(ck, world_size=2))  # as if trained under torchrun --nproc_per_node=2
    with pytest.raises(SystemExit) as e:
        run_trainer("train_ddpo", *args)
    assert re.match(r"error: .* was trained with 2 processes and this run has 1; .*resume with 2", str(e.value))
    assert "\n" not in str(e.value) and len(read_log(out)) == 1


# ---- checkpoints and files -------------------------------------------------------------------------

def test_a_checkpoint_with_a_nan_weight_is_refused_and_the_old_one_kept(tmp_path):
    good = dict(lora={"a.lora_B": torch.ones(2, 2), "a.alpha": 4.0}, optimizer={}, epoch=3, reward_queries=8,
                history=[dict(reward_mean=1.0)])
    runs.save_checkpoint(tmp_path, good)
    bad = dict(good, lora={"a.lora_B": torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), "a.alpha": 4.0}, epoch=4)
    assert runs.non_finite(bad) == "lora/a.lora_B"
    with pytest.raises(SystemExit, match=r"epoch 4 has non-finite values in lora/a.lora_B; not saved: .* keeps"):
        runs.save_checkpoint(tmp_path, bad)
    assert runs.load_checkpoint(tmp_path)["epoch"] == 3 and os.listdir(tmp_path) == ["ckpt.pt"]


class NotPlainData:
    pass


def test_checkpoints_load_with_the_safe_loader_only(tmp_path):
    torch.save(dict(epoch=0, thing=NotPlainData()), tmp_path / "ckpt.pt")  # not plain data: refused, not executed
    with pytest.raises(SystemExit) as e:
        runs.load_checkpoint(tmp_path)
    assert str(e.value).startswith(f"error: cannot read the checkpoint {tmp_path}") and "\n" not in str(e.value)


def test_atomic_write_fsyncs_the_file_and_its_folder_and_cleans_up_a_failed_write(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    path = tmp_path / "log.jsonl"
    runs.write_text(path, "one\n")
    assert synced[0].startswith(str(path) + ".tmp") and synced[-1] == str(tmp_path) and path.read_text() == "one\n"

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        runs.atomic_write(path, fail)
    assert path.read_text() == "one\n" and os.listdir(tmp_path) == ["log.jsonl"]


def test_lora_save_refuses_non_finite_weights(pipe, tmp_path):
    params = lora.inject(pipe.unet)
    lora.save(pipe.unet, tmp_path)
    before = (tmp_path / lora.FILE_NAME).read_bytes()
    with torch.no_grad():
        params[1].fill_(float("inf"))
    with pytest.raises(ValueError, match="not finite"):
        lora.save(pipe.unet, tmp_path)
    assert (tmp_path / lora.FILE_NAME).read_bytes() == before


def test_lora_option_takes_a_run_folder_its_lora_folder_or_the_file(tmp_path):
    weights = tmp_path / "run" / "lora" / lora.FILE_NAME
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    for given in (tmp_path / "run", tmp_path / "run" / "lora", weights):
        assert lora.weights_file(str(given)) == str(weights)
    assert lora.weights_file(str(tmp_path / "elsewhere")) is None


# ---- PRDP --------------------------------------------------------------------------------------------

def test_prdp_skips_a_nan_reward_and_stops_when_it_stays(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch,
                                                         capsys):
    import rewards
    real_load, calls = rewards.load, []

    def load(name, **kw):  # jpeg_incompressibility, NaN for the first image of call 2 and of every call from 4 on
        fn = real_load(name, **kw)

        def wrapped(images, prompts):
            calls.append(1)
            r = fn(images, prompts)
            return torch.cat([r[:1] * float("nan"), r[1:]]) if len(calls) == 2 or len(calls) >= 4 else r
        wrapped.differentiable = False
        return wrapped
    monkeypatch.setattr(rewards, "load", load)
    out = tmp_path / "run"
    args = [f"--model={tiny_pipeline_dir}", "--reward=jpeg_incompressibility", f"--prompts={prompt_file}",
            "--num_steps=4", "--prompts_per_epoch=1", "--images_per_prompt=3", "--sample_batch_size=3",
            "--train_batch_size=3", "--updates_per_epoch=2", "--epochs=6", "--eval_every=100", "--eval_prompts=2",
            "--eval_seeds=2", "--max_skips=2", f"--out={out}"]
    # reward calls: 1 = the evaluation before training, then one per epoch: epoch 0 NaN, 1 good, 2 and 3 NaN
    with pytest.raises(SystemExit, match=r"error: reward jpeg_incompressibility returned nan in epoch 3, on prompt '.*'; "
                                         r"2 updates in a row skipped"):
        run_trainer("train_prdp", *args)
    log = read_log(out)
    assert [r["skipped_updates"] for r in log] == [2, 0, 2] and log[1]["grad_norm"] > 0
    assert capsys.readouterr().err.count("update skipped") == 2  # epochs 0 and 2; epoch 3 stopped the run
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["world_size"] == 1 and runs.non_finite(ck) is None
