"""Run a script (train.py, sample.py) as `__main__` once per argument list, in this one process, so that a batch
of quick-failing command lines pays the import cost once. Reads a JSON list of argument lists on stdin; prints a
JSON list of {"args", "rc", "output"} (rc as the process would have exited with; output = stdout + stderr)."""

import contextlib
import io
import json
import runpy
import sys
import traceback

from hydra.core.global_hydra import GlobalHydra

script, cases = sys.argv[1], json.load(sys.stdin)
results = []
for args in cases:
    GlobalHydra.instance().clear()
    out = io.StringIO()
    sys.argv = [script, *args]
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - an uncaught exception is what a user would see, exit status 1
            traceback.print_exc()
            rc = 1
    results.append({"args": args, "rc": rc, "output": out.getvalue()})
sys.__stdout__.write("\n" + json.dumps(results) + "\n")
