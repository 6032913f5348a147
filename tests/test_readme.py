"""Every code example in README.md runs (python) or names real commands and flags (bash).

Python blocks run in order, each in a fresh namespace, inside a temporary directory that holds
the small runs the README refers to (``runs/tiny-rmoe``, ``runs/tiny-smoe``,
``exports/tiny-mixtral``). A block preceded by ``<!-- readme-test: skip (REASON) -->`` is skipped;
keep those rare. Lines of bash blocks that call ``rmoe`` (or ``-m rmoe.cli.main``) are parsed by
the CLI's own parser: the subcommand and every flag must exist.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(?:<!--\s*readme-test:\s*skip\s*\(([^)]*)\)\s*-->\s*\n)?```(\w+)\n(.*?)```", re.S
)


def _blocks(lang: str) -> list[tuple[int, str | None, str]]:
    """(line number, skip reason or None, code) of every ``lang`` block of the README."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        if m.group(2) == lang:
            line = text.count("\n", 0, m.start(3)) + 1
            out.append((line, m.group(1), m.group(3)))
    return out


def _tiny_config(router_type: str):
    from rmoe import RMoEConfig

    return RMoEConfig(
        vocab_size=258,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        router_type=router_type,
        router_dim=8,
    )


def _save_run(directory: Path, router_type: str) -> None:
    from rmoe import RMoEForCausalLM
    from rmoe.data.tokenizer import Tokenizer

    torch.manual_seed(0)
    RMoEForCausalLM(_tiny_config(router_type)).save_pretrained(directory)
    Tokenizer.bytes().save(directory)


@pytest.fixture()
def readme_dir(tmp_path, monkeypatch):
    """A working directory with the tiny runs and export the README's examples read."""
    from rmoe.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RMOE_LM_EVAL_DIR", str(tmp_path / "lm_eval"))
    _save_run(tmp_path / "runs" / "tiny-rmoe", "recurrent")
    _save_run(tmp_path / "runs" / "tiny-smoe", "linear")
    assert (
        main(["export", "runs/tiny-smoe", "--to", "mixtral", "--out", "exports/tiny-mixtral"]) == 0
    )
    return tmp_path


def test_readme_python_blocks_run(readme_dir):
    blocks = _blocks("python")
    assert len(blocks) >= 2, "README has no python examples"
    ran = 0
    for line, skip, code in blocks:
        if skip is not None:
            assert skip.strip(), f"README.md:{line}: a readme-test skip marker needs a reason"
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        except ModuleNotFoundError as exc:
            if exc.name in {"peft", "lm_eval", "accelerate"}:  # optional extras not installed
                continue
            raise AssertionError(f"README.md:{line}: python block fails: {exc!r}") from exc
        except Exception as exc:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"README.md:{line}: python block fails: {exc!r}") from exc
        ran += 1
    assert ran >= 2
    assert (readme_dir / "my-model" / "model.safetensors").is_file()


def test_readme_migu_snippet_runs():
    import rmoe

    model = torch.nn.Linear(4, 4)
    migu = rmoe.continual.MIGU(model, ratio=0.7)  # the README's inline snippet
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    migu.apply_()
    opt.step()


def _rmoe_commands(code: str) -> list[list[str]]:
    """The argv (after ``rmoe``) of every command line in a bash block that runs the CLI."""
    commands = []
    for logical in re.sub(r"\\\n\s*", " ", code).splitlines():
        logical = logical.strip()
        if not logical or logical.startswith("#"):
            continue
        words = shlex.split(logical, comments=True)
        for i, word in enumerate(words):
            if word == "rmoe" and i == 0:
                commands.append(words[1:])
                break
            if word == "rmoe.cli.main" and i > 0 and words[i - 1] == "-m":
                commands.append(words[i + 1 :])
                break
    return commands


def _fail_on_exit(parser: argparse.ArgumentParser, where: str) -> None:
    """Make ``parser`` and its subparsers raise instead of exiting."""

    def error(message: str) -> None:
        raise AssertionError(f"{where}: {message}")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _fail_on_exit(sub, where)


def test_readme_bash_commands_exist():
    from rmoe.cli.main import build_parser

    checked = 0
    for line, _skip, code in _blocks("bash"):
        for argv in _rmoe_commands(code):
            where = f"README.md:{line}: rmoe {' '.join(argv)}"
            parser = build_parser()
            _fail_on_exit(parser, where)
            _, unknown = parser.parse_known_args(argv)
            flags = [a for a in unknown if a.startswith("-")]
            assert not flags, f"{where}: unknown flags {flags}"
            checked += 1
    assert checked >= 10, f"only {checked} rmoe command lines found in the README's bash blocks"
