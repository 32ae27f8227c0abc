"""Prompt sets: the paper's prompts from prompts.txt, the sets derived from them, the shapes world's
captions, or any text file with one prompt per line; and the categories a set is reported in
(DrawBench's 11, the shapes world's hard and common captions). A prompt may mark phrases with
parentheses for DiffExp's random prompt weighting, "a (dolphin) (riding a bike)"; explore.py strips
the marks before anything is encoded or scored.
"""
import os

import explore
from shapes import world as shapes_world

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")


def _sections(path=PROMPTS_FILE):
    sections, name = {}, None
    with open(path, encoding="utf-8") as f:
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


DRAWBENCH = "drawbench/"  # prompts.txt holds DrawBench one section per category: [drawbench/Colors], ...
DPOK_DROPS = ("Misspellings", "Rare Words")  # the DrawBench categories drawbench_dpok leaves out


def drawbench_categories():
    """DrawBench's prompts (Saharia et al. 2022), each with its category, in prompts.txt's order."""
    return {p: name.removeprefix(DRAWBENCH) for name, lines in _sections().items()
            if name.startswith(DRAWBENCH) for p in lines}


def prompt_sets():
    """Every named prompt set: the sections of prompts.txt plus the derived ones."""
    s = _sections()
    sets = {name: lines for name, lines in s.items() if name != "activities" and not name.startswith(DRAWBENCH)}
    drawbench = drawbench_categories()
    sets["drawbench"] = list(drawbench)  # the paper's generalisation benchmark: 200 prompts, 11 categories
    sets["drawbench_dpok"] = [p for p, c in drawbench.items() if c not in DPOK_DROPS]
    # DDPO / DiffExp's aesthetic prompts are just the animal names.
    # DiffExp's alignment prompts (PickScore): "a(n) <animal> <activity>", both phrases marked.
    sets["animal_activities"] = [f"{_article(a)} ({a}) ({act})" for a in s["animals"] for act in s["activities"]]
    sets["shapes"] = shapes_world.prompts()  # the offline world's 72 captions
    sets["shapes_rare"] = shapes_world.prompts("rare")  # its hard prompts: the 18 naming a rare pair
    sets["shapes_common"] = shapes_world.prompts("common")  # the other 54
    return sets


def check_marks(prompts):
    """Malformed phrase marks are a one-line error before any work, not a traceback mid-run."""
    try:
        for p in prompts:
            explore.parse_phrases(p)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return prompts


def load_prompts(name_or_path):
    """Resolve a prompt set name (see prompt_sets()) or a text file with one prompt per line; exit
    with one line on an unknown name, a file it cannot read as text, an empty file or malformed phrase marks."""
    sets = prompt_sets()
    if name_or_path in sets:
        return check_marks(list(sets[name_or_path]))
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path, encoding="utf-8") as f:
                prompts = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as e:  # no permission to read it; not text (a binary, another encoding)
            raise SystemExit(f"error: cannot read prompt file {name_or_path} ({e}); it must be readable UTF-8 text, "
                             "one prompt per line")
        if not prompts:
            raise SystemExit(f"error: prompt file {name_or_path} has no prompts; put one prompt per line")
        return check_marks(prompts)
    raise SystemExit(f"error: unknown prompt set or missing file {name_or_path!r}; "
                     f"use one of {', '.join(sorted(sets))} or a path to a text file")


def categories(prompts, name="all"):
    """The category of each prompt, for per-category tables: DrawBench's own when every prompt is a
    DrawBench prompt; on the shapes world's captions, hard or common (shapes_world.RARE_PAIRS) and
    the background ("rare, dark background": experiments/compare.py holds the dark
    background out of shapes_rare); otherwise one category, `name` (the set's name)."""
    drawbench = drawbench_categories()
    clean = [explore.parse_phrases(p)[0] for p in prompts]
    if all(c in drawbench for c in clean):
        return [drawbench[c] for c in clean]
    if all(c in shapes_world.CAPTIONS for c in clean):
        rare = set(shapes_world.RARE_CAPTIONS)
        return [f"{'rare' if c in rare else 'common'}, {shapes_world.BACKGROUND_NAMES[shapes_world.parse_prompt(c)[2]]}"
                " background" for c in clean]
    return [name] * len(prompts)


def spread_subset(prompts, n):
    """n prompts of the set that cover as many of its marked phrases, and pairs of phrases, as n
    prompts can: the trainers' evaluation prompts. On the shapes world, 16 of the 72 captions show
    every colour, shape and background, and many of their combinations (every 4th caption, the
    rule before, never showed a cross). Greedy: each pick adds the most phrases and phrase pairs
    not yet shown, ties going to the evenly spaced prompts first, so a set without marks (the
    animals) gets evenly spaced prompts."""
    n = min(n, len(prompts))
    spaced = [round(k * len(prompts) / n) for k in range(n)]
    order = list(dict.fromkeys(spaced + list(range(len(prompts)))))  # evenly spaced ones first

    def features(p):
        phrases = explore.parse_phrases(p)[1] or [explore.parse_phrases(p)[0]]
        return set(phrases) | {(a, b) for a in phrases for b in phrases if a < b}

    chosen, shown = [], set()
    for _ in range(n):
        best = max((i for i in order if i not in chosen), key=lambda i: len(features(prompts[i]) - shown))
        chosen.append(best)
        shown |= features(prompts[best])
    return [prompts[i] for i in chosen]
