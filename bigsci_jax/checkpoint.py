"""orbax checkpoints of {train state, data iterator position, run config}.

Saves are asynchronous (the step loop goes on while arrays are written) and
atomic (orbax writes to a temporary directory and renames it when complete, so
a half-written step is never listed). A temporary directory left by a process
killed mid-save is reported and removed when the training loop next opens the
directory (readers such as evaluation leave a live run's saves alone).
Restoring takes an abstract state whose leaves carry the target shardings, so a
checkpoint written on one mesh is read directly into another.
"""

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

TMP_MARK = ".orbax-checkpoint-tmp"
log = logging.getLogger(__name__)


def remove_partial_saves(directory):
  """Delete the temporary step directories of interrupted saves (process 0); returns
  their names. They are never restored: orbax lists finalized steps only."""
  if not os.path.isdir(directory):
    return []
  partial = sorted(n for n in os.listdir(directory) if TMP_MARK in n)
  for name in partial:
    log.warning("checkpoint %s in %s was only partly written (the run stopped while saving "
                    "it); it is skipped and removed.", name.split(TMP_MARK)[0], directory)
    if jax.process_index() == 0:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return partial


class Checkpoints:
  """A model_dir/checkpoints manager: save every N steps, keep the last K."""

  def __init__(self, directory, *, every, keep, async_save=True, owner=False):
    """owner: this process trains into `directory` (removes interrupted saves)."""
    self.every = every
    if owner:
      remove_partial_saves(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self):
    return self.manager.latest_step()

  def due(self, step):
    return step % self.every == 0

  def save(self, step, state, data_state, config_dict):
    """Starts an (async) save of `step` unless it is already saved; True if started."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config_dict))
    return self.manager.save(step, args=args, force=True)

  def restore(self, abstract_state, step=None):
    """(state, data_state) of `step` (default: latest), placed as abstract_state says."""
    step = self.latest_step() if step is None else step
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored["state"], restored["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
