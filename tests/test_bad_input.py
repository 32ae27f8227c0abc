"""Bad input, across every script: each row is a command a user might type. Each must stop at once,
before any model work, with exactly one line on stderr that names the option, the value and what
is allowed, exit non-zero, and leave nothing behind. Every row runs in this process (fast, with the
slow paths booby-trapped, so a missing check fails loudly instead of building the shapes world), and
a sample of them as real subprocesses (`python -m <script> ...`, marked slow: ~5 s of imports each)."""
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every script gets the options that keep a missed check cheap ({model}: a folder that does not
# exist, so a trainer that got past its checks fails at the model; {tiny}: the tiny SD-shaped model,
# for the scripts that check it exists; {out}: where it would write; {bad}: the bad files of bad_files).
COMMON = {
    "train_ddpo": ["--model={model}", "--prompts={prompts}", "--reward=jpeg_incompressibility", "--out={out}"],
    "train_alignprop": ["--model={model}", "--prompts={prompts}", "--reward=shapes_appeal", "--out={out}"],
    "train_prdp": ["--model={model}", "--prompts={prompts}", "--reward=jpeg_incompressibility", "--out={out}"],
    "sample": ["--model={model}", "--out={out}/grid.png"],
    "experiments.compare": ["--model={tiny}", "--prompts={prompts}", "--reward=jpeg_incompressibility", "--out={out}"],
    "experiments.bench": ["--model={tiny}"],
    "shapes.build": ["--cache={out}"],
    "shapes.measure": ["--assets={out}"],
    "experiments.evaluate": ["--model={tiny}", "--prompts={prompts}", "--reward=jpeg_incompressibility", "--out={out}"],
}

# script, the bad options, what the one line must say
ROWS = [
    ("train_ddpo", ["--train_batch_size=0"], "--train_batch_size must be >= 1, got 0"),
    ("train_ddpo", ["--grad_accum=0"], "--grad_accum must be >= 1, got 0"),
    ("train_ddpo", ["--inner_epochs=0"], "--inner_epochs must be >= 1, got 0"),
    ("train_ddpo", ["--eta=1.5"], "--eta must be in (0, 1], got 1.5"),
    ("train_ddpo", ["--kl_beta=-0.1"], "--kl_beta must be >= 0"),
    ("train_ddpo", ["--stat_min_count=1"], "--stat_min_count must be between 2 and --stat_buffer=32, got 1"),
    ("train_ddpo", ["--sample_batch_size=1", "--num_batches=1", "--samples_per_prompt=1", "--train_batch_size=1"],
     "sample_batch_size*num_batches = 1: the advantages are rewards standardised over the epoch's samples"),
    ("train_ddpo", ["--lr=-1"], "--lr must be > 0, got -1.0"),
    ("train_ddpo", ["--lr=1e999"], "--lr expects a finite number, got '1e999'"),
    ("train_ddpo", ["--num_steps=0"], "--num_steps must be >= 1, got 0"),
    ("train_ddpo", ["--weight_max=0.5"], "--weight_max must be >= 1, got 0.5"),
    ("train_ddpo", ["--device=tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("train_ddpo", ["--device=mps"], "--device must be auto, cpu, cuda or cuda:N, got 'mps'; mps is not supported"),
    ("train_ddpo", ["--precision=fp8"], "--precision must be auto, fp32, bf16 or fp16, got 'fp8'"),
    ("train_ddpo", ["--eval_batch_size=0"], "--eval_batch_size must be >= 1, got 0"),
    ("train_alignprop", ["--precision=half"], "--precision must be auto, fp32, bf16 or fp16, got 'half'"),
    ("train_prdp", ["--device=cuda:x"], "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ("train_ddpo", ["--model={tiny}", "--num_steps=2000"],  # needs the model: refused after it loads, before any write
     "--num_steps must be <= the model's 1000 training timesteps, got 2000"),
    ("train_alignprop", ["--eta=1.5"], "--eta must be between 0 and 1, got 1.5"),
    ("train_alignprop", ["--draft_lv=2", "--truncation=3"], "--draft_lv=2 back-propagates through the last step only"),
    ("train_alignprop", ["--checkpointing=ture"], "--checkpointing must be auto, true or false, got 'ture'"),
    ("train_alignprop", ["--reward=jpeg_compressibility"], "python train_ddpo.py --reward=jpeg_compressibility"),
    ("train_prdp", ["--images_per_prompt=1", "--sample_batch_size=1"], "--images_per_prompt must be >= 2, got 1"),
    ("train_prdp", ["--eta=1.5"], "--eta must be in (0, 1], got 1.5"),
    ("sample", ["--steps=0"], "--steps must be >= 1, got 0"),
    ("sample", ["--lora={out}/no_such_run"], "no LoRA weights there"),
    ("sample", ["--out={out}/grid.txt"], "--out must end in .png or .jpg"),
    ("sample", ["--precision=bfloat16"], "--precision must be auto, fp32, bf16 or fp16, got 'bfloat16'"),
    ("experiments.compare", ["--args=--precision=fp8"], "in --args (train_ddpo.py): --precision must be auto, fp32, bf16 or fp16"),
    ("experiments.compare", ["--heldout_seeds=1"], "--heldout_seeds must be >= 2, got 1"),
    ("experiments.compare", ["--metrics=shapes_corect"], "--metrics: unknown reward 'shapes_corect'"),
    ("experiments.compare", ["--args=--eta=1.5"], "in --args (train_ddpo.py): --eta must be in (0, 1], got 1.5"),
    ("experiments.bench", ["--alignprop_args=--loss_coef=0"], "in --alignprop_args (train_alignprop.py): --loss_coef must be > 0"),
    ("experiments.bench", ["--json_out={out}/no/such/folder/bench.json"], "its folder does not exist"),
    ("experiments.bench", ["--trainers=prdp", "--prdp_args=--beta=0"], "in --prdp_args (train_prdp.py): --beta must be > 0"),
    ("shapes.build", ["--vae_steps=0"], "--vae_steps must be >= 1, got 0"),
    ("shapes.build", ["--p_empty=1.0"], "--p_empty must be in [0, 1)"),
    ("shapes.measure", ["--per_prompt=1"], "--per_prompt must be >= 2, got 1"),
    ("shapes.measure", ["--world={model}"], "is not a built shapes world"),
    ("train_ddpo", ["--model={tiny}", "--revision=v1"], "--revision=v1 pins a hub model's version, but"),
    ("train_ddpo", ["--model={tiny}", "--variant=bf16"],  # needs the model: refused as it loads, before any write
     "(variant 'bf16'): You are trying to load the model files of the `variant=bf16`"),
    ("sample", ["--model={tiny}", "--revision=v1"], "--revision=v1 pins a hub model's version, but"),
    ("experiments.evaluate", ["--num_seeds=0"], "--num_seeds must be >= 1, got 0"),
    ("experiments.evaluate", ["--eta=1.5"], "--eta must be between 0 and 1, got 1.5"),
    ("experiments.evaluate", ["--reward=shapes_aesthetc"], "unknown reward 'shapes_aesthetc'"),
    ("experiments.evaluate", ["--prompts=drawbenc"], "unknown prompt set or missing file 'drawbenc'"),
    ("experiments.evaluate", ["--lora={out}/no_such_run"], "no LoRA weights there"),
    ("experiments.evaluate", ["--revision=v1"], "--revision=v1 pins a hub model's version, but"),
    ("experiments.evaluate", ["--baseline={out}/table.json"], "not a table.json of experiments/evaluate.py"),
    ("experiments.evaluate", ["--model={model}"], "no diffusers folder at"),
    # prompt files that are not UTF-8 text, have unbalanced phrase marks, or no prompts
    ("train_ddpo", ["--prompts={bad}/latin1.txt"], "cannot read prompt file"),
    ("train_alignprop", ["--prompts={bad}/unbalanced.txt"], "unbalanced '(' in prompt 'a (red circle'"),
    ("train_prdp", ["--prompts={bad}/empty.txt"], "has no prompts"),
    ("sample", ["--prompts={bad}/latin1.txt"], "cannot read prompt file"),
    ("experiments.compare", ["--prompts={bad}/unbalanced.txt"], "unbalanced '(' in prompt"),
    ("experiments.evaluate", ["--prompts={bad}/latin1.txt"], "cannot read prompt file"),
    # an unknown option close to a known one, in another case or with one dash
    ("train_ddpo", ["--LR=1e-4"], "unknown option --LR; did you mean --lr?"),
    ("train_prdp", ["-lr=1e-4"], "unexpected argument '-lr=1e-4'; options look like --key=value; did you mean --lr?"),
    ("sample", ["--LORA=x"], "unknown option --LORA; did you mean --lora"),
    ("experiments.compare", ["--args=--LR=1e-4"], "in --args (train_ddpo.py): unknown option --LR; did you mean --lr?"),
    # nan and inf in a numeric option
    ("train_ddpo", ["--lr=nan"], "--lr expects a finite number, got 'nan'"),
    ("train_alignprop", ["--guidance=inf"], "--guidance expects a finite number, got 'inf'"),
    ("train_prdp", ["--beta=-inf"], "--beta expects a finite number, got '-inf'"),
    ("sample", ["--guidance=NaN"], "--guidance expects a finite number, got 'NaN'"),
    ("experiments.compare", ["--args=--eta=nan"], "in --args (train_ddpo.py): --eta expects a finite number, got 'nan'"),
    # somewhere that cannot be written: a file in the way
    ("train_ddpo", ["--out={bad}/a_file/run"], "is a file); pass --out=<somewhere you can write to>"),
    ("train_alignprop", ["--out={bad}/a_file/run"], "is a file); pass --out=<somewhere you can write to>"),
    ("train_prdp", ["--out={bad}/a_file"], "is a file); pass --out=<somewhere you can write to>"),
    ("sample", ["--out={bad}/a_file/grid.png"], "is a file); pass --out=<somewhere you can write to>"),
    ("experiments.compare", ["--out={bad}/a_file/compare"], "is a file); pass --out=<somewhere you can write to>"),
    ("experiments.evaluate", ["--out={bad}/a_file/eval"], "is a file); pass --out=<somewhere you can write to>"),
    # run folders whose checkpoint, config or LoRA file is corrupt, or not this run's (left as they are)
    ("train_ddpo", ["--out={bad}/unreadable_checkpoint"], "cannot read the checkpoint"),
    ("train_alignprop", ["--out={bad}/not_a_checkpoint"], "ckpt.pt is not a resume checkpoint (a dict without optimizer, epoch"),
    ("train_prdp", ["--out={bad}/another_config"], "ckpt.pt) with a different config (beta: 1.0 -> 100.0)"),
    ("train_ddpo", ["--out={bad}/corrupt_config"], "config.json is not a run's config"),
    ("train_prdp", ["--model={tiny}", "--out={bad}/another_model"],
     "attn1.to_q': the saved A (4, 5) and B (7, 4) do not fit this UNet's 8 -> 8 layer); pass --out=<new folder>"),
    ("sample", ["--model={tiny}", "--lora={bad}/corrupt.safetensors"], "corrupt.safetensors is not a readable safetensors"),
    ("experiments.evaluate", ["--lora={bad}/corrupt.safetensors"], "corrupt.safetensors is not a readable safetensors"),
]
IDS = [f"{script}{''.join(args)}" for script, args, _ in ROWS]
# As real processes, a sample: each script's first row (its options) and its first row of a bad file. Every
# row of a script leaves by the same SystemExit, so the exit code and the one stderr line are the same path
# for all; each row's own check and message are tested in-process, all of them. (A row as a process takes
# about 5 s of imports: all 77 would be some 6 minutes of the test run.)


def first_rows(rows):
    """The indices of each script's first row of options and its first row of a bad file."""
    seen, picked = set(), []
    for i, (script, args, _) in enumerate(rows):
        kind = (script, any("{bad}" in a for a in args))
        if kind not in seen:
            seen.add(kind)
            picked.append(i)
    return picked


SAMPLED = first_rows(ROWS)


def command(script, args, tmp_path, tiny, prompts):
    fill = dict(model=tmp_path / "no_such_model", out=tmp_path / "out", tiny=tiny, prompts=prompts, bad=tmp_path / "bad")
    return [a.format(**fill) for a in COMMON[script] + args]


@pytest.fixture
def bad_files(tmp_path):
    """The bad files the rows name as {bad}/...; returns a snapshot of them (path -> bytes), to check
    that a refusal left them as they were."""
    import torch
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("a (caf\xe9) on a (dark background)\n".encode("latin-1"))  # not UTF-8
    (bad / "unbalanced.txt").write_text("a (red circle\n")
    (bad / "empty.txt").write_text("# only a comment\n\n")
    (bad / "a_file").write_text("in the way of a folder\n")
    (bad / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # cut short
    for name in ("unreadable_checkpoint", "not_a_checkpoint", "another_config", "corrupt_config", "another_model"):
        (bad / name).mkdir()
    (bad / "unreadable_checkpoint" / "ckpt.pt").write_bytes(b"PK\x03\x04 cut short")
    torch.save({"lora": {}}, bad / "not_a_checkpoint" / "ckpt.pt")
    # a checkpoint of another config in a folder without its config.json (deleted, or the file copied in)
    torch.save(dict(lora={}, optimizer={}, epoch=0, reward_queries=4, history=[], config={"beta": 1.0}),
               bad / "another_config" / "ckpt.pt")
    (bad / "corrupt_config" / "config.json").write_text('{"lr": 0.0003, "epo')  # cut short
    # a checkpoint of another model behind the same --model: its LoRA layer has another width than this UNet's
    n = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.save(dict(lora={n + ".lora_A": torch.zeros(4, 5), n + ".lora_B": torch.zeros(7, 4), n + ".alpha": 4.0},
                    optimizer={}, epoch=0, reward_queries=4, history=[]), bad / "another_model" / "ckpt.pt")
    return {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()}


def unchanged(bad_files, tmp_path):
    return {p: p.read_bytes() for p in (tmp_path / "bad").rglob("*") if p.is_file()} == bad_files


@pytest.mark.parametrize("script, args, message", ROWS, ids=IDS)
def test_in_process(script, args, message, tmp_path, tiny_pipeline_dir, prompt_file, bad_files, monkeypatch):
    import sampling
    from shapes import build as shapes_build
    from shapes import models as shapes_models

    def boom(*a, **k):
        raise AssertionError("got past the input checks")
    for module, name in ((sampling, "rollout"), (shapes_build, "ensure_world"), (shapes_models, "new_vae"),
                         (subprocess, "Popen")):
        monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(sys, "argv", [script, *command(script, args, tmp_path, tiny_pipeline_dir, prompt_file)])
    with pytest.raises(SystemExit) as e:
        monkeypatch.delitem(sys.modules, script, raising=False)  # run as `python -m` runs it: not imported yet
        runpy.run_module(script, run_name="__main__", alter_sys=True)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and message in msg, msg
    assert not (tmp_path / "out").exists() and unchanged(bad_files, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script, args, message", [ROWS[i] for i in SAMPLED], ids=[IDS[i] for i in SAMPLED])
def test_as_a_subprocess(script, args, message, tmp_path, tiny_pipeline_dir, prompt_file, bad_files):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               SHAPES_CACHE=str(tmp_path / "cache"),  # a missed check must not build into the real cache
               TQDM_DISABLE="1")  # the model-loading bars of the row that needs the model
    res = subprocess.run([sys.executable, "-m", script, *command(script, args, tmp_path, tiny_pipeline_dir, prompt_file)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = res.stderr.splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists() and unchanged(bad_files, tmp_path)
