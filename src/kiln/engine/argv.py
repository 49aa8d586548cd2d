"""Which doit command lines are a plain `doit build`: only those may leave unchanged manifests out
of the task list (kiln.state.fresh)."""

from __future__ import annotations

from pathlib import Path

TASK = "build"  # doit basename: tasks are build:<model>/<targets>/<rule>

# doit options that leave the meaning of `doit build` alone (which dodo file, how many workers, how
# verbose): with only these, unchanged manifests may be left out of the task list. Anything else
# (-a, a task name, another command) gets every manifest's tasks, as doit would list, clean or force them.
_PLAIN_SHORT_WITH_VALUE = ("-n", "-P", "-v", "-f", "-d")  # also glued: -n2
_PLAIN_LONG_WITH_VALUE = ("--process", "--parallel-type", "--verbosity", "--file", "--dir")  # also --process=2
_PLAIN_FLAGS = ("-c", "--continue", "-k", "--seek-file")


def plain_build(argv: list[str]) -> bool:
    """Whether argv is `doit [run] [build] [-n N] [-P thread] [-v N] [-c] [name=value...]`."""
    if not argv or "doit" not in (Path(argv[0]).name, Path(argv[0]).parent.name):
        return False  # not doit's command line (dodo.py imported by something else)
    words, args = [], iter(argv[1:])
    for arg in args:
        if arg in _PLAIN_SHORT_WITH_VALUE or arg in _PLAIN_LONG_WITH_VALUE:
            next(args, None)
        elif arg in _PLAIN_FLAGS or arg.split("=", 1)[0] in _PLAIN_LONG_WITH_VALUE or arg[:2] in _PLAIN_SHORT_WITH_VALUE:
            continue
        elif arg.startswith("-"):
            return False
        elif "=" not in arg:  # name=value is a doit variable (manifest=...)
            words.append(arg)
    return words in ([], [TASK], ["run"], ["run", TASK])
