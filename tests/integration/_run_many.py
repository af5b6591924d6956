"""Run scripts (train.py, sample.py, `-m ldm.<module>`) as `__main__` once per argument list, in this one process,
so that a batch of command lines pays the import cost once. Reads a JSON list on stdin: argument lists for the
script named in argv[1], or {"script": <path or "-m module">, "args": [...]} objects; prints a JSON list of
{"args", "rc", "output"} (rc as the process would have exited with; output = stdout + stderr), also written to the
file $RUN_MANY_OUT when set (training runs may leave worker processes that print to the real stdout)."""

import contextlib
import io
import json
import os
import runpy
import sys
import traceback

from hydra.core.global_hydra import GlobalHydra

default_script, cases = (sys.argv[1] if len(sys.argv) > 1 else None), json.load(sys.stdin)
results = []
for case in cases:
    script, args = (case["script"], case["args"]) if isinstance(case, dict) else (default_script, case)
    GlobalHydra.instance().clear()
    out = io.StringIO()
    module = script[3:] if script.startswith("-m ") else None
    sys.argv = [module or script, *args]
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - an uncaught exception is what a user would see, exit status 1
            traceback.print_exc()
            rc = 1
    results.append({"args": args, "rc": rc, "output": out.getvalue()})
sys.__stdout__.write("\n" + json.dumps(results) + "\n")
if os.environ.get("RUN_MANY_OUT"):
    with open(os.environ["RUN_MANY_OUT"], "w") as f:
        json.dump(results, f)
