"""SIGTERM -> save the current step and exit 0, within a grace period.

One process: a SIGTERM handler raises a flag the loop reads after each step.
Several processes: jax's preemption sync manager (jax.distributed, SIGTERM by
default) picks the one step at which every process stops, so all save the same
step. If the save has not finished `grace_s` seconds after the signal, the
process exits 1 with a line saying which checkpoint the next start resumes from.
"""

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

_requested = threading.Event()


def _watchdog(grace_s, say):
  def expire():
    say(f"error: the checkpoint was not written within TrainConfig.preemption_grace_s="
        f"{grace_s:g} s of SIGTERM; the next start resumes from the last complete checkpoint.")
    sys.stderr.flush()
    os._exit(1)
  timer = threading.Timer(grace_s, expire)
  timer.daemon = True
  timer.start()


def install(grace_s, say):
  """Catch SIGTERM for one training loop; returns what uninstall() restores."""
  _requested.clear()
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    return None

  def handler(signum, frame):
    if not _requested.is_set():
      _requested.set()
      _watchdog(grace_s, say)
  return signal.signal(signal.SIGTERM, handler)


def uninstall(previous):
  if previous is not None:
    signal.signal(signal.SIGTERM, previous)


def reached(step):
  """True at the step where this run stops for a preemption (the same on every process)."""
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point(step)
  return _requested.is_set()
