"""kiln.engine.argv.plain_build: which doit command lines are a plain `doit build` (only those may
leave unchanged manifests unplanned). The command lines tests/test_fresh.py already checks are not
repeated; these add each option doit may be given on its own (worker count and kind, verbosity,
dodo file and folder, continue, seek-file, name=value variables), the spellings `doit build` and
`doit run build`, and what must never count as plain: forcing (-a, --always-execute), single tasks,
task names, other doit commands, options kiln does not know, and a command line that is not doit's."""

from __future__ import annotations

import pytest

from kiln.engine.argv import plain_build

PLAIN = [
    ["doit", "build"],
    ["doit", "run"],
    ["doit", "run", "build"],
    ["/usr/local/bin/doit", "build"],
    ["doit", "-n", "2"],
    ["doit", "-n2", "build"],
    ["doit", "--process=2", "build"],
    ["doit", "--process", "4", "build"],
    ["doit", "-P", "thread", "build"],
    ["doit", "-Pthread", "-n", "2", "build"],
    ["doit", "--parallel-type=thread", "build"],
    ["doit", "--parallel-type", "process", "-n", "3"],
    ["doit", "-v", "2", "build"],
    ["doit", "-v2", "run", "build"],
    ["doit", "--verbosity", "0", "build"],
    ["doit", "-c"],
    ["doit", "--continue", "build"],
    ["doit", "-k", "build"],
    ["doit", "--seek-file", "build"],
    ["doit", "--file=dodo.py", "build"],
    ["doit", "-d", "sub", "build"],
    ["doit", "--dir", "sub", "build"],
    ["doit", "manifest=manifests/a.toml"],
    ["doit", "build", "manifest=a,b"],
    ["doit", "run", "-n", "2", "build", "manifest=x"],
]

NOT_PLAIN = [
    ["doit", "-a"],
    ["doit", "build", "-a"],
    ["doit", "--always-execute", "build"],
    ["doit", "-ca", "build"],  # -a hidden in a group of flags
    ["doit", "-s", "build:bert/x/validate"],
    ["doit", "--single", "build"],
    ["doit", "build:bert/x/validate"],
    ["doit", "run", "build:bert/x/validate"],
    ["doit", "-n", "2", "build:bert/x/validate"],
    ["doit", "build", "build:bert/x/validate"],
    ["doit", "list"],
    ["doit", "list", "--all"],
    ["doit", "-n", "2", "list"],
    ["doit", "clean"],
    ["doit", "clean", "build"],
    ["doit", "forget"],
    ["doit", "forget", "build"],
    ["doit", "ignore", "build"],
    ["doit", "info", "build"],
    ["doit", "help"],
    ["doit", "run", "list"],
    ["doit", "--pdb", "build"],
    ["doit", "-r", "json", "build"],  # another reporter: kiln's would not write the reports
    ["doit", "--db-file", "other.db", "build"],
    ["doit", "--unknown-option", "build"],
    ["kiln", "build"],  # kiln's own command passes skip_unchanged itself
    ["python", "-m", "pytest", "tests"],
    ["/usr/bin/python3", "dodo.py", "build"],
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_a_plain_build_may_leave_unchanged_manifests_out(argv: list[str]):
    assert plain_build(argv) is True


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=" ".join)
def test_anything_else_plans_every_manifest(argv: list[str]):
    assert plain_build(argv) is False


@pytest.mark.parametrize("argv, plain", [
    (["doit"], True),
    (["/venv/lib/python3.11/site-packages/doit/__main__.py", "build"], True),
    (["doit", "-n", "2", "build", "manifest=manifests/a.toml"], True),
    (["doit", "-n2", "-P", "thread", "--verbosity=2", "-f", "dodo.py", "run", "build"], True),
    (["doit", "-c", "build"], True),
    (["doit", "-a", "build"], False),
    (["doit", "build:a/fp32/validate"], False),
    (["doit", "list"], False),
    (["doit", "clean"], False),
    (["doit", "forget"], False),
    (["pytest", "build"], False),
    ([], False),
])
def test_plain_build_command_lines(argv: list[str], plain: bool):
    assert plain_build(argv) is plain
