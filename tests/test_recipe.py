"""The defaults are the recipe: every stage that run_tiny.sh runs, run with no flags, does the same
work, and no script, help text or README line cites a section of the research log."""
import re
import shlex
from pathlib import Path

import pytest

import collect
import eval as ev
import infer
import make_probe
import rl
import sft

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"make_probe.py": make_probe, "collect.py": collect, "sft.py": sft, "rl.py": rl, "infer.py": infer,
          "eval.py": ev}
HARMLESS = {"overwrite"}   # replaces an earlier run's output; what is computed is the same


def run_tiny_commands() -> list[tuple[str, list[str]]]:
    """(script, its flags) for every `python <stage>.py ...` line of run_tiny.sh, continuations joined."""
    text = (ROOT / "run_tiny.sh").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) >= 2 and words[0] == "python" and words[1] in STAGES:
            out.append((words[1], words[2:]))
    return out


def test_run_tiny_runs_every_stage_in_order():
    assert [script for script, _ in run_tiny_commands()] == list(STAGES)


@pytest.mark.parametrize("script, flags", run_tiny_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_stage_with_no_flags_does_what_run_tiny_does(script, flags):
    stage = STAGES[script]
    given, default = vars(stage.parse_args(flags)), vars(stage.parse_args([]))
    differ = {k: (given[k], default[k]) for k in given if given[k] != default[k] and k not in HARMLESS}
    assert not differ, f"run_tiny.sh's {script} differs from its defaults: {differ}"


def test_a_flag_that_differs_from_the_default_is_caught():
    """The comparison above can fail: a changed rate is seen."""
    assert vars(rl.parse_args(["--lr", "3e-4"]))["lr"] != vars(rl.parse_args([]))["lr"]


def test_no_script_or_course_page_cites_a_log_section():
    pattern = re.compile(r"(NOTES(\.md)?|LOG\.md)[^\n]{0,12}(§|section|sections)\s*\d|(^|[^\w])§\s*\d", re.I)
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".sh") and ".venv" not in p.parts
             and "runs" not in p.parts and "tests" not in p.parts]
    files += [ROOT / "README.md", ROOT / "docs" / "gpu.md"]
    cited = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not cited
