"""Prompt sets: the paper's sets, files and their errors, and the trainers' evaluation subset."""
import pytest

import prompt_sets
from shapes import world as shapes_world


def test_prompt_sets_match_the_papers():
    animals = prompt_sets.load_prompts("animals")
    assert len(animals) == 45 == len(set(animals)) and animals[0] == "cat" and "kangaroo" in animals
    aa = prompt_sets.load_prompts("animal_activities")
    assert len(aa) == 135 and "an (owl)" not in aa
    assert "a (dolphin) (riding a bike)" in aa and "an (ant) (playing chess)" in aa
    unseen = prompt_sets.load_prompts("unseen_animals")
    assert len(unseen) >= 18 and not set(unseen) & set(animals)


def test_prompt_file_and_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n# comment\na (blue) square\n")
    assert prompt_sets.load_prompts(str(f)) == ["a red circle", "a (blue) square"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(SystemExit, match="no prompts"):
        prompt_sets.load_prompts(str(empty))
    with pytest.raises(SystemExit, match="unknown prompt set"):
        prompt_sets.load_prompts("animalz")
    with pytest.raises(SystemExit, match="unbalanced"):
        prompt_sets.check_marks(["a (red circle"])


def test_the_evaluation_subset_shows_every_colour_shape_and_background():
    captions = prompt_sets.load_prompts("shapes")
    subset = prompt_sets.spread_subset(captions, 16)
    assert len(set(subset)) == 16 and set(subset) <= set(captions)
    read = [shapes_world.parse_prompt(p) for p in subset]
    for i, names in enumerate((shapes_world.COLOUR_NAMES, shapes_world.SHAPES, shapes_world.BACKGROUND_NAMES)):
        assert {r[i] for r in read} == set(range(len(names)))
    # balanced as well as complete: each shape 4 times, each background 5 or 6 times
    assert sorted(sum(r[1] == s for r in read) for s in range(4)) == [4, 4, 4, 4]
    assert sorted(sum(r[2] == b for r in read) for b in range(3)) == [5, 5, 6]
    # the rule before (every 4th caption) never showed a cross
    assert 3 not in {shapes_world.parse_prompt(p)[1] for p in captions[::4][:16]}


def test_the_evaluation_subset_of_unmarked_prompts_is_evenly_spaced():
    animals = prompt_sets.load_prompts("animals")
    assert prompt_sets.spread_subset(animals, 5) == [animals[i] for i in (0, 9, 18, 27, 36)]
    assert prompt_sets.spread_subset(animals[:3], 16) == animals[:3]  # never more than the set holds


def test_drawbench_has_200_prompts_in_11_categories():
    drawbench = prompt_sets.load_prompts("drawbench")
    cats = prompt_sets.categories(drawbench)
    # the published sheet's counts per category (Saharia et al. 2022)
    counts = {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20, "Descriptions": 20,
              "Gary Marcus et al.": 10, "Misspellings": 10, "Positional": 20, "Rare Words": 7, "Reddit": 38, "Text": 21}
    assert len(drawbench) == len(set(drawbench)) == 200 and {c: cats.count(c) for c in set(cats)} == counts
    assert drawbench[0] == "A red colored car." and drawbench[-1].startswith("New York Skyline with 'Google Research")
    assert cats[drawbench.index("Octothorpe.")] == "Rare Words" and cats[drawbench.index("Tcennis rpacket.")] == "Misspellings"
    assert any("Schönhausen" in p for p in drawbench)  # read as UTF-8 whatever the locale
    dpok = prompt_sets.load_prompts("drawbench_dpok")
    assert len(dpok) == 183 and set(dpok) < set(drawbench)
    assert set(prompt_sets.categories(dpok)) == set(counts) - {"Misspellings", "Rare Words"}
    # the per-category sections are not sets of their own
    assert not [name for name in prompt_sets.prompt_sets() if "/" in name]


def test_categories_of_the_shapes_world_and_of_other_sets():
    captions = prompt_sets.load_prompts("shapes")
    cats = prompt_sets.categories(captions)
    assert len(set(cats)) == 6 and cats.count("rare, dark background") == 6 and cats.count("common, light background") == 18
    assert cats[captions.index("a (red) (triangle) on a (grey) background")] == "rare, grey background"
    assert cats[captions.index("a (red) (circle) on a (grey) background")] == "common, grey background"
    assert {c.split(",")[0] for c in prompt_sets.categories(prompt_sets.load_prompts("shapes_rare"))} == {"rare"}
    unseen = prompt_sets.load_prompts("unseen_animals")
    assert prompt_sets.categories(unseen, "unseen_animals") == ["unseen_animals"] * len(unseen)
    mixed = ["A red colored car.", "a red circle on a dark background"]  # neither all DrawBench nor all shapes
    assert prompt_sets.categories(mixed) == ["all", "all"]
