"""orbax checkpoints of {train state, data iterator position, run config}.

Saves are asynchronous (the step loop goes on while arrays are written) and
atomic (orbax writes to a temporary directory and renames it when complete, so
a half-written step is never listed). A temporary directory left by a process
killed mid-save is reported and removed when the training loop next opens the
directory (readers such as evaluation leave a live run's saves alone).
Restoring takes an abstract state whose leaves carry the target shardings, so a
checkpoint written on one mesh is read directly into another.
"""

import json
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

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


class CheckpointMismatch(ValueError):
  """A checkpoint's arrays do not fit the state the current config builds."""


def _path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree):
  return {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _config_fields(config_dict):
  """{'model.d_ff': 256, ...} for the parts that decide the state's shapes."""
  shaped = {"model": None, "optimizer": None, "train": ("spike_window",)}
  config_dict = json.loads(json.dumps(config_dict or {}))  # tuples read back as lists
  return {f"{part}.{k}": v for part, only in shaped.items()
          for k, v in config_dict.get(part, {}).items() if only is None or k in only}


def describe_mismatch(saved_shapes, wanted_shapes, saved_config, config):
  """One sentence naming the differing arrays and config fields, or None if they fit."""
  differ = [f"{n} {list(saved_shapes[n])} vs {list(wanted_shapes[n])}"
            for n in wanted_shapes if n in saved_shapes and saved_shapes[n] != wanted_shapes[n]]
  missing = [n for n in wanted_shapes if n not in saved_shapes]
  extra = [n for n in saved_shapes if n not in wanted_shapes]
  if not (differ or missing or extra):
    return None
  parts = []
  for label, names in (("shapes differ (checkpoint vs config)", differ),
                       ("not in the checkpoint", missing), ("only in the checkpoint", extra)):
    if names:
      more = f" and {len(names) - 4} more" if len(names) > 4 else ""
      parts.append(f"{label}: {', '.join(names[:4])}{more}")
  saved_fields, fields = _config_fields(saved_config), _config_fields(config)
  changed = [f"{k}={saved_fields.get(k)!r} in the checkpoint, {fields[k]!r} now"
             for k in fields if saved_fields and saved_fields.get(k) != fields[k]]
  cause = (f"; the config fields that differ: {', '.join(changed)}" if changed else "")
  return "; ".join(parts) + cause


class Checkpoints:
  """A model_dir/checkpoints manager: save every N steps and at keep_steps; keep the last
  K and those of keep_steps."""

  def __init__(self, directory, *, every, keep, async_save=True, owner=False, keep_steps=()):
    """owner: this process trains into `directory` (removes interrupted saves)."""
    self.every, self.keep_steps = every, frozenset(keep_steps)
    if owner:
      remove_partial_saves(directory)
    keeping = {"max_to_keep": keep}
    if keep_steps:
      keeping = {"preservation_policy": preservation.AnyPreservationPolicy(
          [preservation.LatestN(keep), preservation.CustomSteps(sorted(keep_steps))])}
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, create=True, enable_async_checkpointing=async_save, **keeping)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def due(self, step):
    return step % self.every == 0 or step in self.keep_steps

  def save(self, step, state, data_state, config_dict):
    """Starts an (async) save of `step` unless it is already saved; True if started."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config_dict))
    return self.manager.save(step, args=args, force=True)

  def check_fits(self, abstract_state, step, config_dict=None, only=None):
    """Raise CheckpointMismatch naming the arrays (and config fields) that differ between
    checkpoint `step` and abstract_state (with only="params": the checkpoint's params
    and abstract_state = {"params": ...})."""
    saved = _shapes(self.manager.item_metadata(step)["state"])
    if only:
      saved = {n: s for n, s in saved.items() if n.split("/")[0] == only}
    message = describe_mismatch(saved, _shapes(abstract_state), None, None)
    if message is None:
      return
    saved_config = self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    message = describe_mismatch(saved, _shapes(abstract_state), saved_config, config_dict)
    raise CheckpointMismatch(
        f"checkpoint step {step} in {self.directory} does not fit this config: {message}. "
        f"Restore it with the config it was saved with (its config.gin), or train into a new "
        f"model_dir.")

  def restore(self, abstract_state, step=None, config_dict=None):
    """(state, data_state) of `step` (default: latest), placed as abstract_state says;
    config_dict (the current run) names the differing fields if the shapes do not fit."""
    step = self.latest_step() if step is None else step
    self.check_fits(abstract_state, step, config_dict)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored["state"], restored["data"]

  def restore_params(self, abstract_params, step=None, config_dict=None):
    """The parameters alone of `step` (default: latest), placed as abstract_params' leaves
    say (their shardings may name pinned host memory): inference never reads, and so
    never allocates, the optimizer state."""
    step = self.latest_step() if step is None else step
    wanted = {"params": abstract_params}
    self.check_fits(wanted, step, config_dict, only="params")
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), wanted)
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restored = reader.restore(os.path.join(self.directory, str(step), "state"),
                              args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                          partial_restore=True))
    return restored["params"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
