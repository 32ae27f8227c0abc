"""Run folders: everything a trainer writes, in out/<run>/: config.json (checked, so re-running the
same command resumes and a different one is refused), ckpt.pt (the resume checkpoint), log.jsonl
(one line per epoch) and reward.png (reward against reward queries).

Everything is written atomically (write a temporary file, then rename), so a run killed at any
moment (even kill -9) leaves either the old file or the new one, never half of one.
"""
import json
import os


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def check_run(out, config, ignore=()):
    """Refuse a run folder that holds a run with a different config: re-running the same command
    resumes, but a different config in the same folder would silently mix two experiments in one
    log. Keys in `ignore` may differ (e.g. stop_after). Cheap: call it before any model loads."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = [k for k in sorted(set(old) | set(config)) if k not in ignore and old.get(k) != config.get(k)]
    if diff:
        k = diff[0]
        raise SystemExit(f"error: {out} holds a run with a different config ({k}: {old.get(k)!r} -> "
                         f"{config.get(k)!r}); re-run with the same options to resume, or pass "
                         f"--out=<new folder> (or delete {out}) to start fresh")


def prepare_run(out, config, ignore=()):
    """check_run, then create the folder and write config.json."""
    check_run(out, config, ignore)
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "config.json"), json.dumps(config, indent=2) + "\n")


def load_checkpoint(out):
    """The run's resume checkpoint (a dict), or None if it has none yet."""
    import torch
    path = os.path.join(out, "ckpt.pt")
    return torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None


def save_checkpoint(out, checkpoint):
    import torch
    atomic_write(os.path.join(out, "ckpt.pt"), lambda tmp: torch.save(checkpoint, tmp))


def write_log(out, history):
    """Rewrite out/log.jsonl (one JSON line per epoch) and the reward-vs-queries plot."""
    write_text(os.path.join(out, "log.jsonl"), "".join(json.dumps(rec) + "\n" for rec in history))
    plot_rewards(history, os.path.join(out, "reward.png"))


def plot_rewards(history, path, title=None):
    """Reward against the number of reward queries (DiffExp's Figure 1b axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    q, r = [h["reward_queries"] for h in history], [h["reward_mean"] for h in history]
    ax.plot(q, r, color="tab:blue", alpha=0.35, label="training samples (per epoch)")
    k = min(8, len(r))  # an epoch's batch covers a few prompts only: show the trend as well
    ax.plot(q[k - 1:], [sum(r[i - k + 1:i + 1]) / k for i in range(k - 1, len(r))], color="tab:blue",
            label=f"training samples ({k}-epoch mean)")
    ev = [(0, h["eval_before"]) for h in history[:1] if "eval_before" in h]  # before any update
    ev += [(h["reward_queries"], h["eval_reward"]) for h in history if "eval_reward" in h]
    if ev:
        ax.plot(*zip(*ev), "o-", label="evaluation (plain sampling)")
    ax.set_xlabel("reward queries")
    ax.set_ylabel("reward")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(path))))
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
