"""README.md opens with the two commands a newcomer runs; CI runs the second one."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```")[1::2]
    return [b.strip().removeprefix("sh").strip() for b in blocks[:2]]


def test_readme_starts_with_install_and_test_commands():
    run, test = _commands()
    assert "pip install" in run and "ernie-compile" in run and "ernie-run" in run
    assert "pip install" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
    _, test = _commands()
    pytest_cmd = test.split("&&")[-1].strip()
    assert pytest_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
