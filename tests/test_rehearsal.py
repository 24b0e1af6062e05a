"""Every command in the README and in docs/*.md runs as written, at debug size.

The commands are read from the documents' fenced shell blocks (```bash, ```sh, ``` with no language;
in an unlabelled block, the lines that start with a known program or a `$ ` prompt), so a command
added to the docs is run here by default. Each is rewritten mechanically to debug size, never by
hand: `--preset debug` (the preset's own task kept), `steps` capped, `--episodes` capped, one task
and one seed for a benchmark, and every `--logdir`/`--root`/`--out` moved under one temporary
directory, which is also the working directory (so `runs/walker/0` of one command is the run the
next command evaluates). A command that cannot run here is in NOT_HERE with its reason; a command
neither run nor listed fails. Commands that touch the same directory run in the docs' order, the
others side by side (a few processes at a time).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
STEPS = 600          # env steps of a rewritten train run: the debug preset's own (prefill 200, 4 training phases)
EPISODES = 2         # evaluation episodes of a rewritten eval
TIMEOUT = 1200       # seconds per command (the machine may be shared)
PARALLEL = 3

# The one table of commands that do not run here as written. With a refusal, the command IS run and
# must be refused in one line (exit status 2) naming that text, leaving its directory uncreated.
NOT_HERE: dict[str, tuple[str, str | None]] = {
    "bash scripts/install.sh": ("installs system packages and a new .venv (CI's .ci/run does, on a fresh machine)", None),
    ".venv/bin/python -m pytest -q tests": ("the whole suite, of which this test is part (CI runs it: .ci/run)", None),
    'pip install "dreamer_tf[wandb]" "dreamer_tf[mlflow]"': ("installs from the network; both extras are in the "
                                                            "test environment ([dev])", None),
    'dreamer-tf train --logdir runs/walker --preset paper --set strategy=mirrored "devices=[/gpu:0,/gpu:1]"':
        ("needs 2 GPUs; here it must be refused at once naming the visible devices", "not visible here; visible: /cpu:0"),
    "dreamer-tf benchmark --root /data/bench --gpus 0 1 2 3 --runs-per-gpu 2": ("needs 4 GPUs", None),
    "dreamer-tf benchmark --root /shared/dmc --backend ray --address auto --gpus-per-run 0.5 --cpus-per-run 4 "
    "--set precision=16": ("needs a running Ray cluster with GPUs and shared storage "
                           "(tests/test_benchmark.py runs a local Ray instance)", None),
    "DREAMER_FEED_KEY=\"$(cat /run/secrets/dreamer_feed_key)\" TF_CONFIG='{\"cluster\":{\"worker\":[\"hostA:12345\",\"hostB:12345\"]},\"task\":{\"type\":\"worker\",\"index\":0}}' "
    "dreamer-tf train --logdir runs/walker --task dmc_walker_walk --preset paper --set strategy=multi_worker":
        ("needs two hosts (tests/test_multi_worker.py runs chief and follower on 127.0.0.1)", None),
    "DREAMER_FEED_KEY=\"$(cat /run/secrets/dreamer_feed_key)\" TF_CONFIG='{\"cluster\":{\"worker\":[\"hostA:12345\",\"hostB:12345\"]},\"task\":{\"type\":\"worker\",\"index\":1}}' "
    "dreamer-tf train --logdir unused --set strategy=multi_worker":
        ("needs two hosts (tests/test_multi_worker.py runs chief and follower on 127.0.0.1)", None),
}

PROGRAMS = ("dreamer-tf", "python", "bash", "pip", "tensorboard")
PATH_OPTIONS = ("--logdir", "--root", "--out")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    text: str                    # as in the docs, comment and prompt dropped, continuations joined
    where: list[str] = field(default_factory=list)  # doc:line of every occurrence

    @property
    def words(self) -> list[str]:
        try:
            return shlex.split(self.text)
        except ValueError:  # an unclosed quote: not a command (prose in an unlabelled block)
            return []

    @property
    def program(self) -> str:
        words = self.words
        return next((w for w in words if not ASSIGN.match(w)), "")


def _lines(body: str, first_line: int):
    """(line number, logical line) of a block, backslash continuations joined."""
    pending, start = "", first_line
    for i, raw in enumerate(body.splitlines()):
        if not pending:
            start = first_line + i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""


def _code(line: str) -> str:
    """The line without its trailing `# comment` (a # outside quotes after a space), spaces collapsed."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            line = line[:i]
            break
    return re.sub(r"\s+", " ", line).strip()


def commands() -> list[Command]:
    """Every command of the docs in reading order (README first), each text once; `a && b` is two."""
    found: dict[str, Command] = {}
    for doc in DOCS:
        text = doc.read_text()
        for block in FENCE.finditer(text):
            if block["lang"] not in ("bash", "sh", "shell", "console", ""):
                continue
            first = text.count("\n", 0, block.start("body")) + 1
            for number, line in _lines(block["body"], first):
                line = line.strip()
                prompt = line.startswith("$ ")
                code = _code(line[2:] if prompt else line)
                if not code:
                    continue
                for part in code.split(" && "):
                    command = Command(part.strip())
                    known = command.program in PROGRAMS or command.program.startswith(".venv/bin/")
                    if block["lang"] == "" and not (prompt or known):
                        continue  # output or a layout in an unlabelled block
                    found.setdefault(command.text, command).where.append(f"{doc.relative_to(ROOT)}:{number}")
    return list(found.values())


# --- mechanical rewriting to debug size --------------------------------------------------------
class NoRule(Exception):
    """No rewrite rule for this command: it must be listed in NOT_HERE."""


def _option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def _replace(words: list[str], name: str, value: str) -> list[str]:
    if name in words:
        i = words.index(name)
        return words[:i + 1] + [value] + words[i + 2:]
    return words + [name, value]


def _values(words: list[str], name: str) -> list[str]:
    """The values of a multi-value option (`--tasks a b c`)."""
    if name not in words:
        return []
    i, out = words.index(name) + 1, []
    while i < len(words) and not words[i].startswith("--"):
        out.append(words[i])
        i += 1
    return out


def _keep_first(words: list[str], name: str, default: str) -> list[str]:
    values = _values(words, name)
    if not values:
        return words + [name, default]
    i = words.index(name)
    return words[:i + 1] + values[:1] + words[i + 1 + len(values):]


def _cap_steps(words: list[str], fresh: bool) -> list[str]:
    out, capped = [], False
    for w in words:
        if w.startswith("steps="):
            w, capped = f"steps={min(int(float(w[6:])), STEPS)}", True
        out.append(w)
    return out if capped or not fresh else out + ["--set", f"steps={STEPS}"]


def _preset_task(preset: str) -> str:
    from dreamer_tf import config
    return config.load(preset).task


def rewrite(command: Command, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The command's argv and environment at debug size under `tmp`; NoRule if it has no rule."""
    words = command.words
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    while words and ASSIGN.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words:
        raise NoRule("no program")
    program = words[0]
    if program.startswith(".venv/bin/"):
        program = program.removeprefix(".venv/bin/")
    for opt in PATH_OPTIONS:  # every directory under the one temporary directory
        if opt in words:
            words = _replace(words, opt, str(tmp / _option(words, opt).lstrip("/")))
    if program == "dreamer-tf" and len(words) > 1:
        sub, rest = words[1], words[2:]
        if sub == "train":
            logdir = _option(rest, "--logdir")  # none: the CLI refuses it, and that command fails alone
            fresh = logdir is None or not (Path(logdir) / "config.yaml").exists()
            preset = _option(rest, "--preset") or ("paper" if fresh else None)
            if preset:
                if "--task" not in rest and _preset_task(preset) != _preset_task("debug"):
                    rest += ["--task", _preset_task(preset)]
                rest = _replace(rest, "--preset", "debug")
            rest = _cap_steps(rest, fresh)
            if "precision=16" in rest and fresh:
                # float16's loss-scale search skips about 10 updates from 2^15 (issue 29): at debug size,
                # 2 updates a phase, 600 steps would end inside it; 8 a phase, as the matrix's cell.
                rest += ["--set", "train_steps=8"]
            if any("wandb" in w for w in rest):
                env["WANDB_MODE"] = "offline"  # no account here: W&B writes its run files locally
        elif sub == "eval":
            if "--episodes" in rest:
                rest = _replace(rest, "--episodes", str(min(int(_option(rest, "--episodes")), EPISODES)))
        elif sub == "benchmark":
            if "--backend" in rest or "--gpus" in rest:
                raise NoRule("a benchmark on GPUs or a Ray cluster")
            if "--dry-run" not in rest:
                rest = _replace(rest, "--preset", "debug")
                rest = _replace(rest, "--steps", str(STEPS))
                rest = _keep_first(_keep_first(rest, "--tasks", "dmc_walker_walk"), "--seeds", "0")
        elif sub == "bench":
            rest = _keep_first(rest, "--presets", "debug")
            rest[rest.index("--presets") + 1] = "debug"
            rest = _replace(rest, "--repeats", "1")
            if "--out" not in rest:
                rest += ["--out", str(tmp / "bench")]
        elif sub not in ("table", "plot", "report"):
            raise NoRule(f"dreamer-tf {sub}")
        return [str(BIN / "dreamer-tf"), sub, *rest], env
    if program == "python" and len(words) > 1 and words[1].startswith("scripts/"):
        return [sys.executable, str(ROOT / words[1]), *words[2:]], env
    if program == "tensorboard":
        return [str(BIN / "tensorboard"), *words[1:], "--inspect"], env  # prints what it would serve, exits
    raise NoRule(program)


# --- running them ------------------------------------------------------------------------------
@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    target: Path | None = None   # the directory the command works in, and whether it existed before
    existed: bool = False


def _key(command: Command) -> str:
    """The directory a command works in (its group: run in the docs' order), or its own text."""
    words = command.words
    for opt in PATH_OPTIONS:
        if opt in words:
            return _option(words, opt).rstrip("/")
    return command.text


def _run(command: Command, tmp: Path) -> Result | NoRule:
    try:
        argv, env = rewrite(command, tmp)
    except NoRule as e:
        return e
    target = tmp / _key(command).lstrip("/")
    existed = target.exists()
    try:
        proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return Result(argv, -1, str(e.stdout or ""), f"timed out after {TIMEOUT} s", target, existed)
    return Result(argv, proc.returncode, proc.stdout, proc.stderr, target, existed)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Result | NoRule]:
    tmp = tmp_path_factory.mktemp("rehearsal")
    before = _repo_state()
    todo = [c for c in commands() if c.text not in NOT_HERE or NOT_HERE[c.text][1] is not None]
    groups: dict[str, list[Command]] = {}
    for c in todo:
        groups.setdefault(_key(c), []).append(c)
    # A group whose directory holds others' (`tensorboard --logdir runs`) runs after them.
    keys = list(groups)
    later = [k for k in keys if any(o != k and o.startswith(k + "/") for o in keys)]
    out: dict[str, Result | NoRule] = {}

    def run_group(key: str) -> None:
        for c in groups[key]:
            out[c.text] = _run(c, tmp)

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(run_group, [k for k in keys if k not in later]))
    for k in later:
        run_group(k)
    out["<repository>"] = Result([], 0 if _repo_state() == before else 1, before, _repo_state())
    return out


def _repo_state() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout


ALL = commands()


def test_the_docs_have_commands_and_the_table_is_current():
    texts = {c.text for c in ALL}
    assert len(ALL) >= 20, [c.text for c in ALL]
    stale = [k for k in NOT_HERE if k not in texts]
    assert not stale, f"NOT_HERE lists commands no longer in the docs: {stale}"


IDS = [f"{c.where[0]}:{c.program.rsplit('/', 1)[-1]}" + (f":{c.words[c.words.index(c.program) + 1]}" if c.program.endswith("dreamer-tf") else "")
       for c in ALL]


@pytest.mark.slow
@pytest.mark.parametrize("command", ALL, ids=IDS)
def test_command_runs_as_written(command, results):
    if command.text in NOT_HERE and NOT_HERE[command.text][1] is None:
        pytest.skip(f"not here: {NOT_HERE[command.text][0]}")
    result = results[command.text]
    if isinstance(result, NoRule):
        pytest.fail(f"{command.where}: `{command.text}` is neither run here (no rule for {result}) nor listed "
                    f"in NOT_HERE with its reason")
    shown = f"{shlex.join(result.argv)}\nexit {result.returncode}\n{result.stderr[-3000:]}"
    if command.text in NOT_HERE:  # must be refused in one line, at once, leaving nothing
        assert result.returncode == 2, shown
        assert result.stderr.strip().count("\n") == 0 and NOT_HERE[command.text][1] in result.stderr, shown
        assert result.existed or not result.target.exists(), f"{result.target} was left behind\n{shown}"
        return
    assert result.returncode == 0, shown
    assert "Traceback" not in result.stderr, shown
    if result.argv[1:2] == ["train"]:
        assert "finished:" in result.stdout, shown
        metrics = result.target / "metrics.jsonl"
        trained = [json.loads(line) for line in metrics.read_text().splitlines() if '"model_loss"' in line]
        assert trained, f"no training phase\n{shown}"
        assert trained[-1].get("skipped_updates", 0) < 1, f"every update of the last phase was skipped\n{shown}"


@pytest.mark.slow
def test_no_command_wrote_into_the_repository(results):
    result = results["<repository>"]
    assert result.returncode == 0, f"the checkout changed:\nbefore:\n{result.stdout}\nafter:\n{result.stderr}"
