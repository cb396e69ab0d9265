"""The README tells the truth: its set-up commands come first and its Python examples run."""

import re
from pathlib import Path

import numpy as np

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_the_two_set_up_commands_come_first():
    first, second = blocks("bash")[:2]
    assert first.strip().endswith("pip install -e . && tape compare")
    assert second.strip().endswith("pip install -e '.[test]' && pytest")
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && pytest" in ci  # CI runs the README's test command


def test_the_python_examples_run():
    for code in blocks("python"):
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
        phy2log, log2phy, logcnt = namespace["phy2log"], namespace["log2phy"], namespace["logcnt"]
        assert phy2log.shape == (58, 288) and logcnt.sum(axis=1).tolist() == [288] * 58
        assert np.all(log2phy.max(axis=2) >= 0)
