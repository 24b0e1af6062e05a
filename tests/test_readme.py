"""The README's two set-up commands stay true: CI runs the second one exactly."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_install_and_test_commands():
    install, test = readme_commands()[:2]
    assert install.startswith("bash scripts/install.sh && ") and "dreamer-tf train" in install
    assert test.startswith("bash scripts/install.sh && ") and "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_readme_install_command_names_a_real_preset_and_task():
    from dreamer_tf import config
    install = readme_commands()[0]
    preset = install.split("--preset ")[1].split()[0]
    assert preset in config.presets()


def test_cli_passes_options_to_delegated_subcommands(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "table", "--out", str(tmp_path / "pub")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "pub_table.md").read_text()
    assert "823.39" in table or "823.4" in table  # the paper's Dreamer mean over the 20 tasks
