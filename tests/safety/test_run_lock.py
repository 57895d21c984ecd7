"""One run per output directory: a second run refuses before its first step, naming the first."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from transformers import TrainerCallback

from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from cpt_plugin.safety import LOCK_NAME, OutputDirInUseError, run_lock
from cpt_plugin.safety.run_lock import acquire
from tests.safety.helpers import make_trainer, messages

# Another run, as a bare process that writes the lock as acquire() does (importing torch takes seconds).
_HOLD = (
    "import datetime, json, os, socket, sys, time; "
    "info = dict(pid=os.getpid(), host=socket.gethostname(), command='train.py', "
    "started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')); "
    "os.makedirs(sys.argv[1]); open(os.path.join(sys.argv[1], 'cpt-plugin.lock'), 'w').write(json.dumps(info)); "
    "print('held', flush=True); time.sleep(60)"
)


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


@pytest.fixture
def other_run(tmp_path):
    """Another live process holding tmp_path/out."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


class LockSeen(TrainerCallback):
    def __init__(self) -> None:
        self.holder: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        with open(os.path.join(args.output_dir, LOCK_NAME), encoding="utf-8") as handle:
            self.holder = json.load(handle)
        return control


def test_a_second_run_into_the_same_folder_refuses_before_its_first_step(tmp_path, other_run):
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(OutputDirInUseError) as raised:
        trainer.train()
    message = str(raised.value)
    assert f"pid {other_run.pid} on host {socket.gethostname()!r}, started " in message
    assert "another output_dir" in message and "wait until that run has finished" in message
    assert trainer.state.global_step == 0
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == other_run.pid  # left alone


def test_the_lock_is_held_while_training_and_released_at_the_end(tmp_path):
    seen = LockSeen()
    make_trainer(tmp_path, callbacks=[seen], max_steps=1).train()
    assert seen.holder["pid"] == os.getpid() and seen.holder["host"] == socket.gethostname()
    assert "started" in seen.holder
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    make_trainer(tmp_path, max_steps=1).train()  # the same folder again, one run after the other


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("boom")


def test_the_lock_is_released_when_training_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, callbacks=[Crash()], max_steps=2).train()
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    out = tmp_path / "out"
    out.mkdir()
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2026-12-01T10:00:00+00:00"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1
    notice = [m for m in messages(caplog) if "taking over the stale lock" in m]
    assert notice and f"pid {stale['pid']}" in notice[0]
    assert not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    info = {"pid": 1, "host": "elsewhere", "started": "2026-12-01T10:00:00+00:00"}
    (out / LOCK_NAME).write_text(json.dumps(info))
    with pytest.raises(OutputDirInUseError, match="on host 'elsewhere'.*delete"):
        acquire(str(out))


def test_the_lock_goes_at_interpreter_exit(tmp_path, monkeypatch):
    at_exit = []
    monkeypatch.setattr(run_lock.atexit, "register", at_exit.append)
    lock = acquire(str(tmp_path / "out"))
    assert at_exit == [lock.release] and (tmp_path / "out" / LOCK_NAME).exists()
    at_exit[0]()  # what the interpreter runs at exit when train() never returned
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_output_dir_lock_off(tmp_path, other_run):
    trainer = make_trainer(tmp_path, max_steps=1, cpt={"output_dir_lock": False})
    trainer.train()
    assert trainer.state.global_step == 1
