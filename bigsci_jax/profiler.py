"""Device traces of chosen training steps, for TensorBoard's Profile tab.

`TrainConfig.profile_steps = n` traces n steps, starting `profile_skip` steps after the
loop starts or resumes (its first steps compile, so they are not what a profile should
show). Every process writes its own trace (`<host>.xplane.pb`) to one folder,
`model_dir/plugins/profile/<time>_steps_<first>-<last>/`, where
`tensorboard --logdir model_dir` shows it once the tensorboard-plugin-profile package is
installed. Each traced step, from reading its batch to dispatching it, is one
StepTraceAnnotation numbered like its metrics.jsonl line, so the profile's step views
split the trace at steps and show the input's share of each.
"""

import contextlib
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


class StepProfiler:
  """Traces the steps first..last (metrics.jsonl numbering: step s is the update that
  takes the count from s-1 to s); `count=0` traces nothing."""

  def __init__(self, model_dir, first, count, last_step):
    self.model_dir, self.first = model_dir, first
    self.last = min(first + count - 1, last_step)
    self.session, self.traced = None, None

  @contextlib.contextmanager
  def step(self, step, state):
    """Around the work of `step` (batch and dispatch): the trace starts at the first one,
    once the device has finished the steps before (`state`), so it holds only its own."""
    if step == self.first and self.first <= self.last:
      jax.block_until_ready(state)
      now = time.time()
      if jax.process_count() > 1:  # one folder for all hosts: process 0's clock names it
        now = float(multihost_utils.broadcast_one_to_all(np.float64(now)))
      options = jax.profiler.ProfileOptions()
      options.session_id = (f"{time.strftime('%Y_%m_%d_%H_%M_%S', time.localtime(now))}"
                            f"_steps_{self.first}-{self.last}")
      jax.profiler.start_trace(self.model_dir, profiler_options=options)
      self.session = options.session_id
    if self.session is None:
      yield
    else:
      self.traced = step
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        yield

  def finish(self, step, state):
    """After `step` was dispatched: at the window's last step, wait for the device to
    finish it and write the trace. Returns what close() returns."""
    if self.session is None or step < self.last:
      return None
    jax.block_until_ready(state)
    return self.close()

  def close(self):
    """Write the trace if one is running (also for a run that stops inside the window):
    (first step, last step traced, the trace's folder), else None."""
    if self.session is None:
      return None
    jax.profiler.stop_trace()
    folder = os.path.join(self.model_dir, "plugins", "profile", self.session)
    self.session = None
    return self.first, self.traced, folder
