"""experiments/mechanism.py on the tiny pipeline: the checkpoints are the baseline run's own weights, the
variants differ from plain sampling only in the exploration switches, a re-run trains nothing again, and
the table's statistics against a hand computation."""
import json
import os

import pytest
import torch

import lora
import pipelines
from conftest import read_log
from plumbing import configurator, evaluation

TRAINER_ARGS = ("--num_steps=3 --sample_batch_size=2 --samples_per_prompt=1 --num_batches=1 --train_batch_size=2 "
                "--epochs=2 --eval_prompts=2 --eval_seeds=1 --eval_every=1")
PROMPTS = ["a (red circle) on a (dark background)", "a (blue square)", "an (orange) (triangle)", "a (green cross)"]


def configured(*argv):
    return configurator.fresh("experiments.mechanism", argv)


@pytest.fixture(scope="module")
def measured(tiny_pipeline_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mechanism")
    (folder / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["--reward=jpeg_incompressibility", f"--prompts={folder / 'p.txt'}", "--samples=2", "--checkpoints=0,0.5,1",
            f"--out={folder / 'm'}", f"--args=--model={tiny_pipeline_dir} {TRAINER_ARGS}"]
    return dict(folder=folder / "m", argv=argv, result=configured(*argv).main())


def test_checkpoints_are_the_baseline_runs_weights_and_a_rerun_trains_nothing(measured, tiny_pipeline_dir):
    folder, result = measured["folder"], measured["result"]
    assert list(result["cells"]) == [0, 1, 2] and len(read_log(folder / "baseline")) == 2
    # the last checkpoint is the finished run's saved LoRA (saved with B scaled by alpha / r, A as trained)
    final = torch.load(folder / "lora-e2.pt", weights_only=True)
    pipe = pipelines.load_pipeline(tiny_pipeline_dir)
    lora.load(pipe.unet, str(folder / "baseline" / "lora"))
    for name, layer in lora.layers(pipe.unet).items():
        torch.testing.assert_close(layer.lora_A, final[name + ".lora_A"], rtol=0, atol=0)
        scale = final[name + ".alpha"] / final[name + ".lora_A"].shape[0]
        torch.testing.assert_close(layer.lora_B, scale * final[name + ".lora_B"])
    log_before = (folder / "baseline.txt").read_text()
    again = configured(*measured["argv"]).main()
    assert (folder / "baseline.txt").read_text() == log_before  # no training the second time
    assert json.loads(json.dumps(again["cells"])) == json.loads((folder / "table.json").read_text())["cells"]


def test_variants_differ_from_plain_only_in_the_exploration_switches():
    mod = configured("--args=--epochs=3")
    configs = {v: mod.resolve(["--epochs=3", *flags]) for v, flags in mod.VARIANTS.items()}
    switched = ("explore", "explore_cfg", "explore_weights", "w_low")
    assert {v: tuple(c[k] for k in switched) for v, c in configs.items()} == {
        "plain": (False, True, True, 1.0), "explore": (True, True, True, 1.0), "cfg_only": (True, True, False, 1.0),
        "weights_only": (True, False, True, 1.0), "w_low0": (True, True, True, 0.0)}
    assert all({k: v for k, v in c.items() if k not in switched} ==
               {k: v for k, v in configs["plain"].items() if k not in switched} for c in configs.values())


def test_exploring_with_both_switches_off_or_no_step_above_t_thres_samples_plainly(tiny_pipeline_dir):
    """The ablation switches of sample_grid reach the sampling: off, or a threshold no step passes, the
    images are plain sampling's; weighting on, they are not."""
    pipe = pipelines.load_pipeline(tiny_pipeline_dir)
    grid = lambda **kw: evaluation.sample_grid(pipe, PROMPTS[:2], [0, 1], 5.0, 4, eta=1.0, **kw)
    plain = grid()
    assert torch.equal(grid(exploring=True, explore_cfg=False, explore_weights=False), plain)
    assert torch.equal(grid(exploring=True, t_thres=1000, explore_weights=False, w_low=0.0), plain)
    assert not torch.equal(grid(exploring=True, t_thres=0, explore_weights=False, w_low=0.0), plain)
    assert not torch.equal(grid(exploring=True, explore_cfg=False, weight_max=2.0), plain)


def test_cell_statistics_against_a_hand_computation():
    mod = configured()
    plain = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    r = torch.tensor([2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 8.0, 8.0, 10.0, 12.0])  # 5 prompts x 2 samples
    c = mod.stats(r, torch.tensor([0.0, 1.0] * 5), plain, 2)
    assert c["mean"] == pytest.approx(6.2) and c["top10"] == 12.0  # the top 10% of 10 samples: the best one
    assert c["above_plain_p90"] == pytest.approx(0.2)  # plain's 90th percentile 9.1: 10 and 12 lie above it
    assert c["within_prompt_std"] == pytest.approx((2 ** 0.5) / 5)  # one prompt's pair differs, by 2
    assert c["vs_plain"]["mean"] == pytest.approx(0.7) and c["success"] == 0.5


@pytest.mark.parametrize("extra, message", [(["--checkpoints=0,half"], "--checkpoints takes fractions"),
                                            (["--checkpoints=0,1.5"], "--checkpoints must lie in"),
                                            (["--samples=1"], "--samples must be >= 2"),
                                            (["--trainer=sgd"], "--trainer must be one of")])
def test_bad_input_is_a_one_line_error_with_nothing_written(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        configured(f"--out={tmp_path / 'm'}", *extra).main()
    assert not (tmp_path / "m").exists()
