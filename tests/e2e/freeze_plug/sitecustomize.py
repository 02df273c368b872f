"""Test-only fault injection at an exact point (tests/e2e/test_faults.py): a cluster started with
this folder on PYTHONPATH and HYBRIDIFF_TEST_FREEZE=<dir> loads it in each of its processes. A
worker about to run the command that ``<dir>/plan`` names ("<request id> step <n>" or
"<request id> decode") stops itself there (SIGSTOP), the first worker only, once it has written
its pid to ``<dir>/frozen``; the test then kills it at that very point, not wherever a race with
the request's progress events happens to put it. Nothing changes while no plan names a request.

A second knob: while ``<dir>/slow_single`` holds a number of seconds, every worker sleeps that long
in each step it runs alone (Phase.SINGLE: the CFG batch), so that a lone step surely costs more
than a paired one and the adaptive policy's cost gate opens for a grow (tests/e2e/test_elastic.py),
whatever the machine's load does to the tiny model's step costs."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time

FREEZE_DIR = os.environ.get("HYBRIDIFF_TEST_FREEZE", "")


def _planned(cmd, plan: list[str]) -> bool:
    if len(plan) < 2 or cmd.request_id != plan[0]:
        return False
    which = cmd.WhichOneof("command")
    if plan[1:] == ["decode"]:
        return which == "finish" and cmd.finish.decode
    return plan[1] == "step" and which == "step" and cmd.step.step == int(plan[2])


def _freeze_if_planned(cmd) -> None:
    try:
        with open(os.path.join(FREEZE_DIR, "plan")) as f:
            plan = f.read().split()
    except FileNotFoundError:
        return
    if not _planned(cmd, plan):
        return
    mine = os.path.join(FREEZE_DIR, f"frozen.{os.getpid()}")
    with open(mine, "w") as f:
        f.write(str(os.getpid()))
    try:
        os.link(mine, os.path.join(FREEZE_DIR, "frozen"))  # atomic: one worker only, pid complete
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGSTOP)


def _slow_single_seconds() -> float:
    try:
        with open(os.path.join(FREEZE_DIR, "slow_single")) as f:
            return float(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0.0


def _patch(engine_module) -> None:
    handle = engine_module.WorkerEngine.handle
    phases = engine_module.phases  # the engine looks its phases up there at each step
    single = phases.single

    def handle_or_freeze(self, cmd, *args, **kwargs):
        _freeze_if_planned(cmd)
        return handle(self, cmd, *args, **kwargs)

    def slow_single(self, *args, **kwargs):
        time.sleep(_slow_single_seconds())
        return single(self, *args, **kwargs)

    engine_module.WorkerEngine.handle = handle_or_freeze
    phases.single = slow_single


class _PatchWorkerEngine(importlib.abc.MetaPathFinder):
    """Patches gpu_worker.engine once a worker imports it (other processes never do)."""

    def find_spec(self, name, path, target=None):
        if name != "gpu_worker.engine":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if FREEZE_DIR:
    sys.meta_path.insert(0, _PatchWorkerEngine())
