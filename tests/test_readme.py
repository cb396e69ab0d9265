"""The README tells the truth: its set-up commands come first, its Python examples run, the
files its commands name exist, and its example `tape evaluate` command runs."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from tape import rebalance_experts
from tape.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_the_two_set_up_commands_come_first():
    first, second = blocks("bash")[:2]
    assert first.strip().endswith("pip install -e . && tape compare")
    assert second.strip().endswith("pip install -e '.[test]' && pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && pytest" in ci  # CI runs the README's test command


def test_the_python_examples_run():
    """The blocks run one after the other, as a reader pastes them: the second goes on from the
    first's `weight`."""
    first, *rest = blocks("python")
    namespace: dict = {}
    exec(compile(first, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    phy2log, log2phy, logcnt = namespace["phy2log"], namespace["log2phy"], namespace["logcnt"]
    assert phy2log.shape == (58, 288) and logcnt.sum(axis=1).tolist() == [288] * 58
    assert np.all(log2phy.max(axis=2) >= 0)
    # log2phy as wide as the largest replica count, the width the README gives, padded to
    # the reference's S - E + 1 columns as the README shows.
    assert log2phy.shape[2] == logcnt.max() == int(re.search(r"\(here (\d+)\)", first)[1])
    padded = namespace["padded"]
    assert padded.shape == (58, 256, 33)
    assert np.array_equal(padded[:, :, : log2phy.shape[2]], log2phy)
    assert np.all(padded[:, :, log2phy.shape[2] :] == -1)
    assert len(rest) == 1 and "Rebalancer" in rest[0]
    namespace["phy2log"] = None
    exec(compile(rest[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["phy2log"].shape == (58, 288)
    assert namespace["rebalance"].windows_kept == 1


def test_the_widths_of_log2phy_are_those_the_readme_gives():
    widths = re.search(
        r"on `weight` above: (\d+) for `deepseek`, (\d+) for `tape`, (\d+) for "
        r"`bldm`",
        README.replace("\n", " "),
    )
    weight = np.random.default_rng(0).pareto(1.5, size=(58, 256))  # the README's `weight`
    assert "pareto(1.5, size=(58, 256))" in blocks("python")[0]
    for policy, width in zip(["deepseek", "tape", "bldm"], widths.groups()):
        _, log2phy, _ = rebalance_experts(weight, 288, 8, 4, 32, policy=policy)
        assert log2phy.shape[2] == int(width), policy


def commands() -> list[list[str]]:
    """Every `tape ...` command of the README's bash blocks, as arguments (comments dropped)."""
    lines = "\n".join(blocks("bash")).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("tape ")]


def test_the_files_the_commands_name_exist():
    named = [arg for command in commands() for arg in command if arg.startswith("src/")]
    assert named, "the README names a shipped example program"
    for path in named:
        assert (ROOT / path).is_file(), path


def test_the_public_trace_is_explained_where_the_commands_use_it():
    assert "huggingface.co/datasets/abmfy/eplb-openevolve" in README
    traces = {c[c.index("--trace") + 1] for c in commands() if "--trace" in c}
    assert traces == {"data/expert-load.json"}  # the path the README tells where to download


def test_the_evaluate_example_runs_on_the_shipped_program(tmp_path, monkeypatch):
    (command,) = [c for c in commands() if c[:2] == ["tape", "evaluate"] and "src/" in c[2]]
    # As written from the checkout, but on a small trace and cluster so the test stays fast.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "trace.npy", rng.poisson(20.0, size=(40, 2, 8)).astype(float))
    cluster = shlex.split("--interval 10 --replicas 12 --groups 2 --nodes 2 --gpus 4")
    small = ["--trace", str(tmp_path / "trace.npy"), *cluster]
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, [*command[1:], *small, "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["error"] is None and scores["version"] == 4 and scores["combined_score"] > 0
