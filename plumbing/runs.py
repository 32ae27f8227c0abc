"""Run folders: everything a trainer writes, in out/<run>/: config.json (checked, so re-running the
same command resumes and a different one is refused), ckpt.pt (the resume checkpoint), log.jsonl
(one line per epoch) and reward.png (reward against reward queries); and the fail-safe for
non-finite numbers (Skips).

Everything is written atomically (write a temporary file, flush it to disk, then rename), so a run
killed at any moment (even kill -9, or a power cut) leaves either the old file or the new one, never
half of one. A checkpoint holds tensors and plain data only (loaded with weights_only=True), and one
with a non-finite tensor is never written: the last good one stays.
"""
import json
import os
import sys
import tempfile


def atomic_write(path, write):
    """Call write(tmp_path), fsync it, then rename tmp_path to path (and fsync the folder, so the
    rename itself survives a crash). On an error the temporary file is removed, the old file kept."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # a directory fsync is not supported everywhere (e.g. Windows); the file itself is safe
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


# Options added to the trainers after run folders were made: a config.json without one ran as with
# this value, so resuming it with this value is the same run (and another value is refused).
# (precision: every run before it existed was made on the CPU, where "auto" is the fp32 they ran in.)
# (t5 and kl_beta came with SD 3.5: its T5 encoder, DDPO's KL penalty; off, kl_beta 0, is what ran before.)
ADDED_OPTIONS = {"revision": "", "variant": "", "precision": "auto", "t5": True, "kl_beta": 0.0}


# Options that change how a run is stopped, evaluated in memory, run (compile: the same maths up to
# floating-point rounding) or watched, never what it computes:
# a resume may change them (the dashboards' options are dashboards.OPTIONS; a test keeps them here).
MAY_CHANGE = ("stop_after", "max_skips", "eval_batch_size", "wandb_log", "wandb_project", "wandb_run_name",
              "tensorboard", "compile")


def check_writable(folder, option="--out"):
    """Refuse, in one line and before anything loads, a folder this script cannot write into (a file in
    its way, no permission, a read-only disk): it would fail at its first write, after its model loaded
    (and sample.py after sampling every image). Tried for real, since root passes os.access everywhere:
    a temporary file in the folder, or in the nearest part of its path that exists, made and gone."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is a file")
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write to {folder} ({e}); pass {option}=<somewhere you can write to>")


def differing(old, config, ignore=MAY_CHANGE):
    """The keys, sorted, in which `config` differs from an `old` one, but those in `ignore`; an option
    added since `old` was written (or missing from `config`) counts as its default then (ADDED_OPTIONS)."""
    return [k for k in sorted(set(old) | set(config))
            if k not in ignore and old.get(k, ADDED_OPTIONS.get(k)) != config.get(k, ADDED_OPTIONS.get(k))]


def config_differs(out, old, config, ignore, what):
    """Refuse `config` where it differs from the `old` one (`what` held it) in a key not in `ignore`."""
    diff = differing(old, config, ignore)
    if diff:
        k = diff[0]
        raise SystemExit(f"error: {out} holds {what} with a different config ({k}: {old.get(k)!r} -> "
                         f"{config.get(k)!r}); re-run with the same options to resume, or pass "
                         f"--out=<new folder> (or delete {out}) to start fresh")


def check_run(out, config, ignore=MAY_CHANGE):
    """Refuse a run folder that cannot be written, or holds a run with a different config: re-running
    the same command resumes, but a different config in the same folder would silently mix two
    experiments in one log. Keys in `ignore` may differ (MAY_CHANGE). Cheap: call it before any model loads."""
    check_writable(out)
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        old = e
    if not isinstance(old, dict):
        raise SystemExit(f"error: {path} is not a run's config ({old}); pass --out=<new folder> (or delete {out}) "
                         "to start fresh")
    config_differs(out, old, config, ignore, "a run")


def prepare_run(out, config, ignore=MAY_CHANGE):
    """check_run, then create the folder and write config.json."""
    check_run(out, config, ignore)
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "config.json"), json.dumps(config, indent=2) + "\n")


RESUME_KEYS = ("lora", "optimizer", "epoch", "reward_queries", "history")  # in every trainer's checkpoint


def load_checkpoint(out, config=None, ignore=MAY_CHANGE):
    """The run's resume checkpoint (a dict), or None if it has none yet. Loaded with
    weights_only=True: tensors and plain data only, so a checkpoint cannot run code. Refused in one
    line, and left as it is: a file torch cannot read, one that is not a resume checkpoint, or one
    written with another `config` than this run's (config.json deleted, or the file copied in)."""
    import torch
    path = os.path.join(out, "ckpt.pt")
    if not os.path.exists(path):
        return None
    fresh = f"pass --out=<new folder> (or delete {out}) to start afresh"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read the checkpoint {path} ({str(e).splitlines()[0]}); {fresh}")
    missing = [k for k in RESUME_KEYS if k not in ck] if isinstance(ck, dict) else None
    if missing != []:
        what = f"a dict without {', '.join(missing)}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        raise SystemExit(f"error: {path} is not a resume checkpoint ({what}); {fresh}")
    if config is not None and "config" in ck:
        config_differs(out, ck["config"], config, ignore, f"a checkpoint ({path})")
    return ck


def non_finite(obj, where=""):
    """The path of the first floating-point tensor in `obj` (nested dicts, lists, tuples) holding a
    NaN or an infinity, e.g. "lora/down.0.to_q.lora_B"; None if every tensor is finite."""
    import torch
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        if (bad := non_finite(value, f"{where}/{key}" if where else str(key))) is not None:
            return bad
    return None


def save_checkpoint(out, checkpoint):
    """Write out/ckpt.pt atomically. A checkpoint with a non-finite tensor (NaN weights or optimizer
    state) is refused and the previous one kept; the new file is read back with the safe loader
    before it replaces the old one."""
    import torch
    path = os.path.join(out, "ckpt.pt")
    if (bad := non_finite(checkpoint)) is not None:
        raise SystemExit(f"error: the checkpoint of epoch {checkpoint.get('epoch')} has non-finite values in {bad}; "
                         f"not saved: {path} keeps the last good one (re-run to resume from it)")

    def write(tmp):
        torch.save(checkpoint, tmp)
        torch.load(tmp, map_location="cpu", weights_only=True)  # plain data and readable, or the old file stays
    atomic_write(path, write)


class Skips:
    """The fail-safe for non-finite numbers. A NaN or infinite reward, sample, loss or gradient
    would poison the LoRA weights, so the update it would feed is skipped, with a warning on stderr;
    `limit` skips in a row stop the run with one line saying what went wrong and where. Any update
    that goes through resets the count. The trainers log the skips per epoch (skipped_updates)."""

    def __init__(self, limit, out, verbose=True):
        self.limit, self.out, self.verbose, self.in_a_row = limit, out, verbose, 0

    def skip(self, what, prompts=()):
        """Count a skipped update; `what` went wrong (with the epoch), on `prompts` (the batch's)."""
        unique = list(dict.fromkeys(prompts))
        shown = ", ".join(repr(p) for p in unique[:2]) + (f" and {len(unique) - 2} more" if len(unique) > 2 else "")
        if unique:
            what += f", on prompt{'s' if len(unique) > 1 else ''} {shown}"
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise SystemExit(f"error: {what}; {self.in_a_row} updates in a row skipped, so the run stops "
                             f"(--max_skips={self.limit}); {self.out}/ckpt.pt keeps the last good state")
        if self.verbose:
            print(f"warning: {what}; update skipped ({self.in_a_row} in a row; the run stops at {self.limit})",
                  file=sys.stderr, flush=True)

    def ok(self):
        self.in_a_row = 0


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
