"""Runs several `fastppo` command lines in one process, as `python -m fastppo.cli` would run each
(tests/engine/test_cli.py): the interpreter and torch start once instead of once per case.

    python cli_cases.py CASES.json   ->   prints one JSON list of {"code", "stderr"}

Each case's stderr is what reached file descriptor 2 while it ran (Python, logging handlers and C
code alike); every warning is shown each time, as it would be in a process of its own. `run` can
also be called from a test in pytest's process: `sys.stderr` is pointed at file descriptor 2 while
it runs, since pytest's capture gives Python its own stream.
"""
import json
import os
import sys
import tempfile
import traceback
import warnings

from fastppo.cli import main


def run(argv: list[str]) -> dict:
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved, saved_stream = os.dup(2), sys.stderr
        os.dup2(captured.fileno(), 2)
        sys.stderr = stream = open(2, "w", closefd=False, errors="backslashreplace")
        try:
            try:
                code = main(argv)
            except SystemExit as stop:  # the argument parser's exit
                code = stop.code if isinstance(stop.code, int) else 1
            except Exception:  # escaped main: a traceback, as the command would print
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
        finally:
            stream.close()
            sys.stderr = saved_stream
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return {"code": code, "stderr": captured.read().decode(errors="replace")}


if __name__ == "__main__":
    warnings.simplefilter("always")
    cases = json.loads(open(sys.argv[1]).read())
    print(json.dumps([run(argv) for argv in cases]))
