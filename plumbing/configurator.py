"""Command-line overrides for every script, nanoGPT-style, and nothing else.

Every script keeps its defaults as commented module-level values at the top, nanoGPT-style:

    lr = 3e-4            # AdamW learning rate
    explore = False      # DiffExp exploration for the first 3/4 of training

and then calls `configure(globals())`, which overrides them from the command line:

    python train_ddpo.py --lr=1e-4 --explore --seed 3

`--key=value` and `--key value` both work, a bare `--flag` sets a boolean to True (`--no-flag`
sets it to False) and an auto/on/off switch such as `--compile` to on, dashes and underscores are the same, values are checked against the type of
the default, `--help` lists every key with its default and comment, and an unknown key is an error
that names the closest known keys. A number must be finite (`--lr=nan`, `--lr=1e999` are refused).

The scripts check their values at the top of main(), before anything loads or is written, with
`require` (one line, `error: ...`, exit code 1) and its shorthands at_least, positive and between:

    require(0 < eta <= 1, f"--eta must be in (0, 1], got {eta}")
    at_least(1, epochs=epochs, num_steps=num_steps)     # error: --num_steps must be >= 1, got 0
"""
import ast
import difflib
import importlib
import math
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


ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # how a boolean may be spelled


def switch(value):
    """An auto/on/off option's value (--compile, AlignProp's --checkpointing): "auto", True or False,
    spelled as a boolean may be; None if it is none of them."""
    low = str(value).lower()
    return "auto" if low == "auto" else True if low in ON else False if low in OFF else None


def _convert(key, text, default):
    """Parse the string `text` into the type of `default` (None defaults take any literal)."""
    if isinstance(default, bool):
        low = text.lower()
        if low in ON:
            return True
        if low in OFF:
            return False
        raise SystemExit(f"error: --{key} expects true/false, got {text!r}")
    if isinstance(default, (int, float)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            try:  # nan, inf, -inf, Infinity: floats Python spells only this way, refused below as not finite
                value = float(text)
            except ValueError:
                value = None
        if isinstance(default, int) and isinstance(value, float) and value.is_integer():
            value = int(value)  # allow --epochs=1e2
        ok = isinstance(value, int) if isinstance(default, int) else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise SystemExit(f"error: --{key} expects {kind}, got {text!r}")
        if not math.isfinite(value):
            raise SystemExit(f"error: --{key} expects a finite number, got {text!r}")
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
            hint = closest(arg.lstrip("-").partition("=")[0], defaults) if arg.startswith("-") else ""  # -lr=1
            raise SystemExit(f"error: unexpected argument {arg!r}; options look like --key=value{hint}")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        negate = not eq and key.startswith("no_") and isinstance(defaults.get(key[3:]), bool)
        if negate:
            key = key[3:]
        if key not in defaults:
            raise SystemExit(f"error: unknown option --{key}{closest(key, defaults) or '; see --help'}")
        default = defaults[key]
        if not eq:
            if isinstance(default, bool):
                config[key] = not negate
                continue
            if default == "auto" and (i >= len(argv) or argv[i].startswith("--")):
                config[key] = "on"  # an auto/on/off switch such as --compile: bare means on
                continue
            if i >= len(argv):
                raise SystemExit(f"error: --{key} needs a value")
            text = argv[i]
            i += 1
        config[key] = _convert(key, text, default)
    return config


def closest(key, defaults):
    """"; did you mean --lr?" naming the known options closest to `key` (any case: --LR is --lr), or ""."""
    key = key.lower().replace("-", "_")
    close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
    return f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""


def help_text(defaults, comments, doc=""):
    lines = [doc.strip(), "", "options (default, then what it is for):"] if doc else ["options:"]
    width = max((len(k) for k in defaults), default=0) + 2
    for key, value in defaults.items():
        lines.append(f"  --{key:<{width}} {value!r:<28} {comments.get(key, '')}".rstrip())
    return "\n".join(lines)


def fresh(name, argv=()):
    """Script module `name` as `python -m <name> <argv>` has it, in this process: a fresh copy of its
    module-level defaults (an earlier configure in this process changed them), `argv` applied, its
    config dict as its `config` (what the trainers' main() reads)."""
    module = importlib.reload(importlib.import_module(name))
    module.config = configure(vars(module), [str(a) for a in argv])
    return module


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


def require(ok, message):
    """Stop the script with one line, `error: <message>`, unless `ok`: the input checks every script
    runs first. The message names the option, the value given and what is allowed."""
    if not ok:
        raise SystemExit(f"error: {message}")


def at_least(low, **options):
    """require(value >= low) for each option=value: at_least(1, epochs=epochs)."""
    for key, value in options.items():
        require(value >= low, f"--{key} must be >= {low}, got {value!r}")


def positive(**options):
    """require(value > 0) for each option=value: positive(lr=lr)."""
    for key, value in options.items():
        require(value > 0, f"--{key} must be > 0, got {value!r}")


def between(low, high, **options):
    """require(low <= value <= high) for each option=value."""
    for key, value in options.items():
        require(low <= value <= high, f"--{key} must be between {low} and {high}, got {value!r}")


def parse_options(text):
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (e.g. --reward_options)."""
    pairs = [kv for kv in text.split(",") if kv.strip()]
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise SystemExit(f"error: option {bad[0]!r} is not key=value; write e.g. --reward_options=mlp_path=/x.pth")
    return dict(kv.strip().split("=", 1) for kv in pairs)
