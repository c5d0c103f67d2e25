"""The README's commands work as written, after `. .venv/bin/activate`, from a fresh working directory.

Which commands run: those in a ```bash, ```sh or ```console block that are cheap, that is, whose words are
`rlreason ... --help`, `rlreason inspect ...`, `rlreason traces ...` or `python -c ...`; in a ```console block a
`$ ` line is a command and the lines under it are its output, and a command shown printing `config error:` lines
runs too: it must print exactly those lines and exit with code 2. Everything else (training, evaluation, sampling,
`accelerate launch`) needs the real model or minutes of compute and is not run.

The working directory holds what the README's commands expect of a checkout: a link to `configs/`, each ```python
block whose first line is a comment naming a `.py` file (written there), and `runs/r1`, a tiny real run of 10 steps
with an evaluation every 5, which the `rlreason inspect` examples read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import write_config

from rlreason.cli import main
from rlreason.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_BLOCKS = ("bash", "sh", "console")
CONFIG_ERROR = "config error:"


@dataclasses.dataclass(frozen=True)
class Command:
    text: str
    expected_errors: tuple[str, ...] = ()

    @property
    def kind(self) -> str | None:
        """Why the command is cheap enough to run, or None when it is not run."""
        words = shlex.split(self.text, comments=True)
        if self.expected_errors:
            return "config error"
        if words[:2] == ["python", "-c"]:
            return "reward check"
        if words[:1] != ["rlreason"]:
            return None
        if "--help" in words:
            return "help"
        return words[1] if len(words) > 1 and words[1] in ("inspect", "traces") else None


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def shell_commands(language: str, body: str) -> list[Command]:
    lines = body.replace("\\\n", " ").splitlines()
    if language != "console":
        return [Command(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    commands: list[Command] = []
    for line in lines:
        if line.startswith("$ "):
            commands.append(Command(line[2:].strip()))
        elif commands and line.startswith(CONFIG_ERROR):
            last = commands.pop()
            commands.append(Command(last.text, (*last.expected_errors, line)))
    return commands


def readme_commands() -> list[Command]:
    blocks = fenced_blocks(README.read_text())
    return [c for language, body in blocks if language in SHELL_BLOCKS for c in shell_commands(language, body)]


CHEAP = [c for c in readme_commands() if c.kind]


def test_the_readme_shows_each_kind_of_cheap_command():
    kinds = {c.kind for c in CHEAP}
    assert {"help", "inspect", "traces", "reward check", "config error"} <= kinds, f"README shows only {sorted(kinds)}"


def test_activation_comes_right_after_the_two_setup_commands():
    first = [shlex.split(c.text, comments=True) for c in readme_commands()[:3]]
    assert first == [["make", "train"], ["make", "test"], [".", ".venv/bin/activate"]], first


def config_fields(cls: type, prefix: str) -> list[str]:
    fields = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        fields += config_fields(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
    return fields


def test_every_config_key_is_in_the_configuration_list():
    text = README.read_text()
    listing = text[text.index("## Configuration") :].split("\n## ", 1)[0]
    missing = [key for key in config_fields(Config, "") if f"`{key.rsplit('.', 1)[-1]}`" not in listing]
    assert not missing, f"config keys missing from the README's configuration list: {missing}"


@pytest.fixture(scope="module")
def workdir(tiny_llama, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    (work / "configs").symlink_to(ROOT / "configs")
    for language, body in fenced_blocks(README.read_text()):
        first = body.splitlines()[0] if body else ""
        if language == "python" and re.fullmatch(r"# [\w/]+\.py", first):
            target = work / first[2:]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
    config = write_config(
        work / "r1.yaml",
        tiny_llama,
        work / "runs" / "r1",
        task={"name": "arithmetic", "train_size": 16, "eval_size": 4},
        rollout={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
        train={"steps": 10, "learning_rate": 1e-3, "micro_batch_size": 4},
        run={"eval_every": 5, "log_every": 0},
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(config)]) == 0
    return work


def activated_env() -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(bin_dir.parent)}


@pytest.mark.parametrize("command", CHEAP, ids=[c.text[:60] for c in CHEAP])
def test_readme_command_runs_as_written(command: Command, workdir: Path):
    done = subprocess.run(
        command.text, shell=True, executable="/bin/bash", cwd=workdir, env=activated_env(),
        capture_output=True, text=True, timeout=300,
    )
    if command.expected_errors:
        assert done.returncode == 2, done.stderr
        assert tuple(done.stderr.splitlines()) == command.expected_errors
    else:
        assert done.returncode == 0, f"{command.text}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
