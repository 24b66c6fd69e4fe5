"""README and docs/ cannot drift from the code: every command and flag they name exists, every
shipped sweep is documented, and the sweep reference names every setting and key the loader knows."""

from __future__ import annotations

import dataclasses
import re

import pytest

from cifar_exp import cli
from cifar_exp.config import TRAIN_FIELDS
from cifar_exp.config.goals import Bound
from cifar_exp.config.sweepfile import _TOP_LEVEL, available_sweeps
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
# A command as written: "cifar-exp NAME ...", "python -m cifar_exp NAME ..." or "python -m
# cifar_exp.NAME ...", up to the end of
# the shell command (a comment, a pipe, another command, the end of a code span or line).
INVOCATION = re.compile(r"(?:cifar-exp|python -m cifar_exp[. ])\s*(?P<name>[a-z_]+)(?P<rest>[^`#|;&\n]*)")
BENCH = re.compile(r"python (?P<script>bench/[a-z_]+\.py)(?P<rest>[^`#|;&\n]*)")


def invocations() -> list[tuple[str, str, str]]:
    found = []
    for page, text in TEXT.items():
        text = text.replace("\\\n", " ")  # a command continued on the next line
        found += [(page, m["name"], m["rest"]) for m in INVOCATION.finditer(text)]
    return found


def options(command: str) -> set[str]:
    parser = cli.parser(command)
    return {flag for action in parser._actions for flag in action.option_strings}


def test_the_pages_name_commands() -> None:
    assert {name for _, name, _ in invocations()} >= set(cli.COMMANDS)


@pytest.mark.parametrize("page, name, rest", invocations())
def test_every_command_and_flag_the_docs_name_exists(page: str, name: str, rest: str) -> None:
    assert name in cli.COMMANDS, f"{page}: no command {name}"
    unknown = {flag for flag in re.findall(r"(?<![\w-])--?[a-z][a-z-]*", rest) if flag not in options(name)}
    assert not unknown, f"{page}: {name} has no {sorted(unknown)}"


@pytest.mark.parametrize("page, script, rest", [(page, m["script"], m["rest"]) for page, text in TEXT.items()
                                                for m in BENCH.finditer(text.replace("\\\n", " "))])
def test_every_benchmark_flag_the_docs_name_exists(page: str, script: str, rest: str) -> None:
    source = (ROOT / script).read_text()
    known = set(re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", source))
    unknown = {flag for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest) if flag not in known}
    assert not unknown, f"{page}: {script} has no {sorted(unknown)}"


def test_every_shipped_sweep_is_documented() -> None:
    for name in available_sweeps():
        assert f"| `{name}` |" in TEXT["docs/sweeps.md"], name
        assert f"| `{name}` |" in TEXT["README.md"], name


def test_the_sweep_reference_names_every_setting_and_key() -> None:
    reference = TEXT["docs/sweeps.md"]
    blocks = re.findall(r"```.*?```", reference, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", reference, flags=re.S))
    named = set(re.findall(r"[a-z_]+", " ".join(spans + blocks)))
    missing = [name for name in [*TRAIN_FIELDS, *_TOP_LEVEL] if name not in named]
    assert not missing, f"docs/sweeps.md does not describe {missing}"
    for section, schema in [*((s, _TOP_LEVEL[s]) for s in ("objective", "sampler", "pruner", "data")),
                            ("constraints", Bound)]:
        fields = [f.name for f in dataclasses.fields(schema)]
        assert all(f in named for f in fields), (section, [f for f in fields if f not in named])


def test_every_page_is_linked_from_readme() -> None:
    for page in TEXT:
        if page.startswith("docs/"):
            assert f"]({page})" in TEXT["README.md"], page


def test_readme_s_pictures_are_committed() -> None:
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", "".join(TEXT.values())):
        assert (ROOT / picture).is_file() or (ROOT / "docs" / picture).is_file(), picture


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def test_the_lock_pins_every_dependency_and_ci_and_the_readme_install_with_it() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", line) for line in lines), "exact pins only"
    pinned = {_name(line) for line in lines}
    assert wanted <= pinned, sorted(wanted - pinned)
    assert "pip install -q -e '.[dev]' -c constraints.txt" in (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[dev]' -c constraints.txt && " in TEXT["README.md"]
