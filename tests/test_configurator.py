"""The shared configurator and prompt sets: overrides, types, help, unknown keys."""
import os
import subprocess
import sys
import textwrap

import pytest

from plumbing import configurator
DEFAULTS = {"lr": 3e-4, "epochs": 10, "explore": False, "reward": "shapes_aesthetic", "max_steps": None}


def test_overrides_in_all_three_spellings():
    c = configurator.parse(["--lr=1e-3", "--epochs", "5", "--explore", "--reward", "jpeg_compressibility"], DEFAULTS)
    assert c == {"lr": 1e-3, "epochs": 5, "explore": True, "reward": "jpeg_compressibility", "max_steps": None}
    assert DEFAULTS["lr"] == 3e-4  # defaults untouched


def test_dashes_booleans_and_none_defaults():
    c = configurator.parse(["--max-steps=7", "--explore=false"], DEFAULTS)
    assert c["max_steps"] == 7 and c["explore"] is False
    assert configurator.parse(["--no-explore"], dict(DEFAULTS, explore=True))["explore"] is False
    assert configurator.parse(["--epochs=2e1"], DEFAULTS)["epochs"] == 20
    assert isinstance(configurator.parse(["--lr=1"], DEFAULTS)["lr"], float)


@pytest.mark.parametrize("argv, message", [
    (["--epochs=2.5"], "--epochs expects an integer"),
    (["--lr=fast"], "--lr expects a number"),
    (["--explore=maybe"], "--explore expects true/false"),
    (["--epochs"], "--epochs needs a value"),
    (["epochs=3"], "unexpected argument"),
    (["--epoch=3"], "did you mean --epochs"),
    (["--zzz=3"], "unknown option --zzz"),
])
def test_bad_input_is_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as e:
        configurator.parse(argv, DEFAULTS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_configure_reads_a_scripts_defaults_and_help(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent('''\
        """A toy script."""
        import sys
        sys.path.insert(0, %r)
        from plumbing import configurator
        batch_size = 8          # images per batch
        lr = 1e-3               # learning rate
        NOT_AN_OPTION = 5
        configurator.configure(globals())
        print(batch_size, lr, NOT_AN_OPTION)
        ''' % os.path.dirname(os.path.dirname(configurator.__file__))))  # the repository
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], capture_output=True, text=True)
    assert run("--batch_size=4").stdout.split() == ["4", "0.001", "5"]
    h = run("--help")
    assert h.returncode == 0 and "A toy script." in h.stdout
    assert "--batch_size" in h.stdout and "images per batch" in h.stdout and "0.001" in h.stdout
    assert "NOT_AN_OPTION" not in h.stdout
    bad = run("--NOT_AN_OPTION=3")
    assert bad.returncode != 0 and "unknown option" in bad.stderr
