"""A run's log mirrored to the dashboards researchers compare runs in, when asked: Weights & Biases
(nanoGPT's options: --wandb_log, --wandb_project, --wandb_run_name; WANDB_MODE=offline logs
without a network, `wandb sync` uploads later) and TensorBoard event files (--tensorboard, in
out/<run>/tensorboard; `tensorboard --logdir out`). The run's log.jsonl stays the record that
resume, experiments/compare.py and the plots read: a dashboard only receives each epoch's numbers as rank 0
writes them, at step = epoch.

    dash = dashboards.Dashboards(out, config, enabled=master)   # what config's four options ask for
    dash.log(record)                                            # one epoch's log line
    dash.close()
"""
import importlib.util
import math
import os
import time

from plumbing import runs
OPTIONS = ("wandb_log", "wandb_project", "wandb_run_name", "tensorboard")  # may change between resumes
PACKAGES = {"wandb_log": ("wandb", "wandb==0.31.0"), "tensorboard": ("tensorboardX", "tensorboardX==2.6.5")}


def check(**options):
    """One line, before any model work, when an option asks for a package that is not installed:
    check(wandb_log=True, tensorboard=False)."""
    for key, on in options.items():
        module, pin = PACKAGES[key]
        if on and importlib.util.find_spec(module) is None:
            raise SystemExit(f"error: --{key} needs the {module} package, which is not installed; "
                             f"`pip install {pin}` (the version tested here), or drop --{key}")


def numbers(record):
    """The plottable fields of a log line: finite or NaN numbers (booleans as 0/1), not lists or text."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and (not isinstance(v, float) or not math.isinf(v))}


class Dashboards:
    """The dashboards `config` asks for, on the process that writes (enabled); a no-op otherwise."""

    def __init__(self, out, config, enabled=True):
        self.wandb = self.writer = None
        if not enabled:
            return
        if config.get("tensorboard"):
            from tensorboardX import SummaryWriter  # a resumed run adds an event file; TensorBoard joins them by step
            # event files are named by the second and the host: a resume within the same second would
            # overwrite the first part's file, so each writer's name also carries its start in nanoseconds
            self.writer = SummaryWriter(logdir=os.path.join(out, "tensorboard"), filename_suffix=f".{time.time_ns()}")
        if config.get("wandb_log"):
            import wandb
            # a resumed run continues the same W&B run: its id is kept in the run folder
            id_file, run_id = os.path.join(out, "wandb_id.txt"), None
            if os.path.exists(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip()
            try:
                self.wandb = wandb.init(project=config.get("wandb_project") or None, dir=out, id=run_id, resume="allow",
                                        name=config.get("wandb_run_name") or os.path.basename(os.path.abspath(out)),
                                        config={k: v for k, v in config.items() if k not in OPTIONS})
            except Exception as e:  # e.g. online without an API key: say what to do in one line
                raise SystemExit(f"error: --wandb_log: wandb could not start ({(str(e) or type(e).__name__).splitlines()[0]}); "
                                 "run `wandb login`, or set WANDB_MODE=offline to log without a network")
            runs.write_text(id_file, self.wandb.id + "\n")

    def log(self, record):
        """Send one epoch's log line (what runs.write_log just wrote) to every open dashboard."""
        values = numbers(record)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step=record["epoch"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=record["epoch"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
