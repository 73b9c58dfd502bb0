"""The README's Quickstart stays true: two commands, and CI runs the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all(c.startswith("bash .ci/setup && ") for c in commands)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = quickstart_commands()[1]
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README, run in order in one namespace (from a temp directory)."""
    import pytest
    from meta_tasks import datasets

    if datasets.find_dataset("fashion-mnist") is None:
        pytest.skip("real Fashion-MNIST not installed (bash .ci/setup)")
    text = (ROOT / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```python")[1:]]
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "my-run" / "export" / "model.safetensors").is_file()
