"""The scripts' shared plumbing: command-line overrides and prompt sets.

Every script keeps its defaults as commented module-level values at the top, nanoGPT-style:

    lr = 3e-4            # AdamW learning rate
    explore = False      # DiffExp exploration for the first 3/4 of training

and then calls `configure(globals())`, which overrides them from the command line:

    python train_ddpo.py --lr=1e-4 --explore --seed 3

`--key=value` and `--key value` both work, a bare `--flag` sets a boolean to True (`--no-flag`
sets it to False), dashes and underscores are the same, values are checked against the type of
the default, `--help` lists every key with its default and comment, and an unknown key is an error
that names the closest known keys.
"""
import ast
import difflib
import os
import re
import sys

_DEFAULT_LINE = re.compile(r"^([a-z_][a-z0-9_]*)\s*=\s*.*?(?:#\s*(.*))?$")


def _comments(path):
    """Map each module-level `name = value  # comment` line of `path` to its comment."""
    out = {}
    with open(path) as f:
        for line in f:
            m = _DEFAULT_LINE.match(line.rstrip("\n"))
            if m and m.group(1) not in out:
                out[m.group(1)] = (m.group(2) or "").strip()
    return out


def _convert(key, text, default):
    """Parse the string `text` into the type of `default` (None defaults take any literal)."""
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"error: --{key} expects true/false, got {text!r}")
    if isinstance(default, (int, float)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(default, int) and isinstance(value, float) and value.is_integer():
            value = int(value)  # allow --epochs=1e2
        ok = isinstance(value, int) if isinstance(default, int) else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise SystemExit(f"error: --{key} expects {kind}, got {text!r}")
        return type(default)(value)
    if default is None:
        if text.lower() == "none":
            return None
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text  # str


def parse(argv, defaults, comments=None, doc=""):
    """Return a copy of `defaults` overridden by `argv` (a list like sys.argv[1:])."""
    comments = comments or {}
    config = dict(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(help_text(defaults, comments, doc))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; options look like --key=value")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        negate = not eq and key.startswith("no_") and isinstance(defaults.get(key[3:]), bool)
        if negate:
            key = key[3:]
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
            raise SystemExit(f"error: unknown option --{key}{hint}")
        default = defaults[key]
        if not eq:
            if isinstance(default, bool):
                config[key] = not negate
                continue
            if i >= len(argv):
                raise SystemExit(f"error: --{key} needs a value")
            text = argv[i]
            i += 1
        config[key] = _convert(key, text, default)
    return config


def help_text(defaults, comments, doc=""):
    lines = [doc.strip(), "", "options (default, then what it is for):"] if doc else ["options:"]
    width = max((len(k) for k in defaults), default=0) + 2
    for key, value in defaults.items():
        lines.append(f"  --{key:<{width}} {value!r:<28} {comments.get(key, '')}".rstrip())
    return "\n".join(lines)


def configure(g, argv=None):
    """Override the caller's module-level defaults in place and return them as a dict.

    `g` is the calling script's `globals()`. The keys are its public module-level values of
    type bool/int/float/str/None that are defined on a line of their own in the script (so
    imported modules and helpers are never mistaken for options).
    """
    path = g["__file__"]
    comments = _comments(path)
    defaults = {k: g[k] for k in comments
                if k in g and not k.startswith("_")
                and (g[k] is None or isinstance(g[k], (bool, int, float, str)))}
    config = parse(sys.argv[1:] if argv is None else argv, defaults, comments, g.get("__doc__") or "")
    g.update(config)
    return config


# --------------------------------------------------------------------------------------------
# Prompt sets. prompts.txt holds named sections ("[animals]" then one prompt per line); a few
# sets are derived from them. A prompt may mark phrases with parentheses for DiffExp's random
# prompt weighting (explore.py strips the marks before anything is encoded or scored).

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")


def _sections(path=PROMPTS_FILE):
    sections, name = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                name = line[1:-1].strip()
                sections[name] = []
            elif name is not None:
                sections[name].append(line)
    return sections


def _article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def prompt_sets():
    """Every named prompt set: the sections of prompts.txt plus the derived ones."""
    s = _sections()
    sets = {name: lines for name, lines in s.items() if name != "activities"}
    # DDPO / DiffExp's aesthetic prompts are just the animal names.
    # DiffExp's alignment prompts (PickScore): "a(n) <animal> <activity>", both phrases marked.
    sets["animal_activities"] = [f"{_article(a)} ({a}) ({act})" for a in s["animals"] for act in s["activities"]]
    sets["shapes"] = None  # filled lazily from shapes.py (the offline world's captions)
    return sets


def load_prompts(name_or_path):
    """Resolve a prompt set name (see prompt_sets()) or a text file with one prompt per line."""
    sets = prompt_sets()
    if name_or_path == "shapes":
        import shapes
        return shapes.prompts()
    if name_or_path in sets:
        return list(sets[name_or_path])
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            prompts = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
        if not prompts:
            raise SystemExit(f"error: prompt file {name_or_path} has no prompts; put one prompt per line")
        return prompts
    raise SystemExit(f"error: unknown prompt set or missing file {name_or_path!r}; "
                     f"use one of {', '.join(sorted(sets))} or a path to a text file")


# --------------------------------------------------------------------------------------------
# Run folders, shared by both trainers: out/<run>/config.json, log.jsonl, reward.png, ckpt.pt.
# Everything is written atomically (write a temporary file, then rename), so a run killed at any
# moment (even kill -9) leaves either the old file or the new one, never half of one.

def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def check_run(out, config, ignore=()):
    """Refuse a run folder that holds a run with a different config: re-running the same command
    resumes, but a different config in the same folder would silently mix two experiments in one
    log. Keys in `ignore` may differ (e.g. stop_after). Cheap: call it before any model loads."""
    import json
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
    import json
    check_run(out, config, ignore)
    os.makedirs(out, exist_ok=True)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(os.path.join(out, "config.json"), lambda tmp: open(tmp, "w").write(text))


def write_log(out, history):
    """Rewrite out/log.jsonl (one JSON line per epoch) and the reward-vs-queries plot."""
    import json
    text = "".join(json.dumps(rec) + "\n" for rec in history)
    atomic_write(os.path.join(out, "log.jsonl"), lambda tmp: open(tmp, "w").write(text))
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


def distributed(device="auto"):
    """One process per device under torchrun (gloo on CPU, NCCL on GPU), or a single process.
    Returns (ddp, rank, world_size, torch.device)."""
    import torch
    import torch.distributed as dist
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    return ddp, rank, world, torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")


def parse_options(text):
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (e.g. --reward_options)."""
    pairs = [kv for kv in text.split(",") if kv.strip()]
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise SystemExit(f"error: option {bad[0]!r} is not key=value; write e.g. --reward_options=mlp_path=/x.pth")
    return dict(kv.strip().split("=", 1) for kv in pairs)
