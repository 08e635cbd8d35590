"""The training loop: all I/O lives here (data, logging, evaluation, checkpoints).

Device metrics are fetched one step late: step s's scalars are read after step
s+1 has been dispatched, so the host never waits on the device for logging.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import tqdm

from bigsci_jax import checkpoint, data, flops, held_out, preemption, profiler, sharding
from bigsci_jax import step as steps
from bigsci_jax.config import COMPUTE_FIELDS, ConfigError, RunConfig, to_gin
from bigsci_jax.metrics import MetricsWriter, read_metrics
from bigsci_jax.model import Transformer
from bigsci_jax.optim import make_optimizer


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says what to do."""


class RunNotFound(ValueError):
  """A model_dir holds no run or no checkpoint yet; the message says what to do."""


def read_run(model_dir) -> RunConfig:
  """The RunConfig a train.py run saved in model_dir/config.json."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise RunNotFound(f"{model_dir} holds no run (no config.json); train it first with "
                      f"train.py --model_dir={model_dir}.")
  with open(path) as f:
    try:
      return RunConfig.from_dict(json.load(f))
    except json.JSONDecodeError as e:
      raise RunNotFound(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); restore it from "
                        f"the run's config.gin or train into a new model_dir.") from e


class Runtime:
  """A run's model, optimizer, state shardings and eval step on the current devices.

  offload="host" (inference only): the model reads its parameters from pinned host
  memory (model.Transformer), the eval step takes them there, and restore_params puts
  them there."""

  def __init__(self, run: RunConfig, offload="none"):
    self.run = run
    self.mesh = sharding.make_mesh(run.mesh)
    self.model = Transformer(run.model, offload=offload)
    self.tx, self.schedule = make_optimizer(run.optimizer, run.train.train_steps,
                                            run.batch.batch_size)
    self.abstract, self.shardings = steps.abstract_state(Transformer(run.model), self.tx,
                                                         self.mesh, run.batch.seq_len,
                                                         run.train.spike_window)
    self.params_shardings = sharding.offloaded(self.shardings.params, offload)
    self.eval_step = steps.make_eval_step(self.model, self.mesh, self.params_shardings)

  def _latest(self, model_dir, restore):
    ckpts = checkpoint.Checkpoints(os.path.join(model_dir, "checkpoints"), every=1, keep=1)
    try:
      step = ckpts.latest_step()
      if step is None:
        raise RunNotFound(f"{model_dir} has no checkpoint yet; train it first (train.py "
                          f"--model_dir={model_dir}).")
      return restore(ckpts, step), step
    finally:
      ckpts.close()

  def restore_latest(self, model_dir):
    """(train state, data state, step) of model_dir's latest checkpoint, in this runtime's
    shardings."""
    (state, data_state), step = self._latest(
        model_dir, lambda ckpts, step: ckpts.restore(self.abstract, step, self.run.to_dict()))
    return state, data_state, step

  def restore_params(self, model_dir):
    """(params, step) of model_dir's latest checkpoint, where this runtime's model reads
    them (on the devices, or in pinned host memory with offload="host"); the optimizer
    state is not read."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract.params, self.params_shardings)
    return self._latest(model_dir, lambda ckpts, step: ckpts.restore_params(
        abstract, step, self.run.to_dict()))

  def loss(self, params, batches):
    """Token-weighted loss of these host micro-batches."""
    return held_out.evaluate(self.eval_step, params, {"": (batches, None)}, self.mesh,
                              self.run.batch.micro_batch_size)["loss"]


def write_atomic(path, text):
  """Write text (str or bytes) to path through a temporary file and a rename."""
  tmp = path + ".tmp"
  with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_run(model_dir, run: RunConfig, state, step, data_state, vocab_files=None):
  """A new run in model_dir that train.py continues and every inference command reads:
  config.gin and config.json of `run`, the tokenizer's files ({name: bytes},
  bigsci_jax.tokenizer) if given, and `state` saved as checkpoint `step` (data_state:
  the input position)."""
  os.makedirs(model_dir, exist_ok=True)
  write_vocab_files(model_dir, vocab_files)
  write_atomic(os.path.join(model_dir, "config.gin"), to_gin(run))
  write_atomic(os.path.join(model_dir, "config.json"),
               json.dumps(run.to_dict(), indent=2, sort_keys=True) + "\n")
  out = checkpoint.Checkpoints(os.path.join(model_dir, "checkpoints"), every=1, keep=3,
                               async_save=False)
  out.save(step, state, data_state, run.to_dict())
  out.wait()
  out.close()


def write_params_run(model_dir, run: RunConfig, params, vocab_files=None, seed=0,
                     mesh=None):
  """write_run at step 0 around `params` (host arrays, dropped once placed): put straight
  into their sharded layout on the mesh of `mesh` (a MeshConfig; default run.mesh, which
  is what config.gin keeps either way), with a fresh optimizer state and data position.
  Returns the number of parameters."""
  runtime = Runtime(dataclasses.replace(run, mesh=mesh or run.mesh))
  count = sum(x.size for x in jax.tree.leaves(params))
  placed = jax.device_put(params, runtime.shardings.params)
  del params  # the host copy, when the caller passed it without keeping it
  state = steps.init_state(runtime.model, runtime.tx, runtime.mesh, seed, run.batch.seq_len,
                           params=placed)
  write_run(model_dir, run, state, 0, {"rows": 0}, vocab_files)
  return count


def check_batch_fits_mesh(run: RunConfig, mesh, processes=None):
  processes = jax.process_count() if processes is None else processes
  shards = sharding.batch_shards(mesh)
  if run.batch.micro_batch_size % shards:
    raise ConfigError(f"BatchConfig.micro_batch_size={run.batch.micro_batch_size} must be a multiple "
                      f"of the mesh's data*fsdp={shards} so each batch shard gets whole sequences.")
  if run.batch.micro_batch_size % processes:
    raise ConfigError(f"BatchConfig.micro_batch_size={run.batch.micro_batch_size} must be a multiple "
                      f"of the {processes} processes.")
  smallest = run.batch.warmup_start or run.batch.batch_size
  half = run.batch.micro_batch_size // 2
  if run.train.gns_every and smallest == run.batch.micro_batch_size and (
      run.batch.micro_batch_size % 2 or half % shards or half % processes):
    raise ConfigError(f"TrainConfig.gns_every splits a batch without gradient accumulation into two "
                      f"halves of {run.batch.micro_batch_size / 2:g} sequences, which must be a whole "
                      f"multiple of the mesh's data*fsdp={shards} and of the {processes} processes; "
                      f"use an even micro_batch_size that allows it, or accumulate gradients.")


def make_data(run: RunConfig, split="validation", model_dir=None) -> data.Corpus:
  """The train source and this process's host rows of `split` for each eval set.

  Synthetic data has one unnamed eval set and no vocabulary; a corpus has one set
  per language and a vocabulary whose pieces' byte lengths give bits per byte: the
  one DataConfig.vocab_path names, else the tokenizer model_dir's run already reads
  text with (its embeddings are trained on those ids), else one trained on the corpus.
  Only a corpus imports the data pipeline (seqio, TensorFlow).
  """
  if run.data.mixture != "synthetic":
    from bigsci_jax import pipeline, tokenizer
    own = tokenizer.find(model_dir) if model_dir and not run.data.vocab_path else None
    if own:
      run = dataclasses.replace(run, data=dataclasses.replace(run.data, vocab_path=own))
    return pipeline.open_corpus(run, split)

  def synthetic(split):
    return data.SyntheticLM(run.model.vocab_size, run.batch.seq_len, seed=run.data.seed,
                            split=split, mean_doc_len=run.data.mean_doc_len,
                            prefix_lm=run.model.mask == "prefix",
                            process_index=jax.process_index(), process_count=jax.process_count())
  rows = run.batch.micro_batch_size * run.train.eval_batches
  return data.Corpus(synthetic("train"), {"": synthetic(split).take(rows)})


def write_vocab_files(model_dir, vocab_files):
  """The tokenizer's files ({name: bytes}) in model_dir, each written atomically."""
  for name, content in sorted((vocab_files or {}).items()):
    write_atomic(os.path.join(model_dir, name), content)


def read_tokenizer(model_dir):
  """The bigsci_jax.tokenizer.Tokenizer a run reads text with (its vocab.model, or the
  tokenizer.json of an imported model)."""
  from bigsci_jax import tokenizer
  tok = tokenizer.from_dir(model_dir)
  if tok is None:
    raise RunNotFound(f"{model_dir} has no {tokenizer.SPM_FILE} or tokenizer.json: it trained "
                      f"on synthetic data (no text vocabulary) or before runs kept their "
                      f"vocabulary; train it with train.py.")
  return tok


def _differing(a, b):
  """The names of the fields in which two configs of one dataclass differ."""
  return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


class _Trainer(Runtime):
  """Holds what the loop needs between steps; `run()` is the loop."""

  def __init__(self, run: RunConfig, model_dir, config_text, progress):
    super().__init__(run)
    self.model_dir, self.progress = model_dir, progress
    check_batch_fits_mesh(run, self.mesh)
    self.task_eval, self.scorer = self._task_eval(run), None
    os.makedirs(model_dir, exist_ok=True)
    self.ckpts = checkpoint.Checkpoints(os.path.join(model_dir, "checkpoints"),
                                        every=run.train.checkpoint_every,
                                        keep=run.train.keep_checkpoints,
                                        async_save=run.train.async_checkpoints, owner=True,
                                        keep_steps=run.train.keep_steps)
    # A branch not started yet reads text with its source run's vocabulary.
    self.branching = bool(run.train.branch_from) and self.ckpts.latest_step() is None
    corpus = make_data(run, model_dir=run.train.branch_from if self.branching else model_dir)
    self.source = corpus.train
    self.eval_sets = held_out.make_eval_sets(run, corpus.evals, corpus.token_bytes)
    self.vocab_files, self.config_text = corpus.vocab_files, config_text
    self.train_step = steps.make_train_step(self.model, self.tx, self.schedule, self.mesh,
                                            self.shardings, run.train)
    self.batch_sharding = sharding.batch_sharding(self.mesh, 3, batch_axis=1)
    self.flops_per_token = flops.flops_per_token(run.model, run.batch.seq_len)
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    self.peak_total = peak * jax.device_count() if peak else None

  @staticmethod
  def _task_eval(run):
    """The items of TrainConfig.eval_tasks (evaluate.TaskEval), or None without tasks."""
    if not run.train.eval_tasks:
      return None
    if run.data.mixture == "synthetic":
      raise ConfigError("TrainConfig.eval_tasks scores text, but synthetic data has no "
                        "vocabulary; train on a corpus or set TrainConfig.eval_tasks=[].")
    from bigsci_jax import evaluate as tasks
    from bigsci_jax.corpus import CorpusError
    try:
      return tasks.TaskEval(run.train.eval_tasks, run.train.eval_task_limit)
    except (tasks.EvaluationError, CorpusError) as e:
      raise ConfigError(f"TrainConfig.eval_tasks={list(run.train.eval_tasks)}: {e}") from e

  def restore_or_init(self):
    """(state, start step); the run's files are written once its checkpoint has restored,
    so a config that does not fit the checkpoint leaves model_dir as it was."""
    start = self.ckpts.latest_step()
    if self.branching:
      state, data_state, start = self.branch_start(self.run.train.branch_from,
                                                   self.run.train.branch_step)
      self.source.set_state(data_state)
    elif start is None:
      state = steps.init_state(self.model, self.tx, self.mesh, self.run.train.seed,
                               self.run.batch.seq_len, self.run.train.spike_window)
      if self.run.train.init_from:
        state = state.replace(params=self.warm_start_params(self.run.train.init_from))
    else:
      state, data_state = self.ckpts.restore(self.abstract, start, self.run.to_dict())
      self.source.set_state(data_state)
    if jax.process_index() == 0:
      write_vocab_files(self.model_dir, self.vocab_files)  # evaluation reads text with it
      if self.config_text:
        write_atomic(os.path.join(self.model_dir, "config.gin"), self.config_text)
      write_atomic(os.path.join(self.model_dir, "config.json"),
                   json.dumps(self.run.to_dict(), indent=2, sort_keys=True) + "\n")
    return state, start or 0

  def branch_start(self, source_dir, step):
    """(state, data state, step) of source_dir's checkpoint `step` (None: its latest), for
    a run that continues it under its own schedule and length (a cooldown branch of a
    'wsd' run); its metrics lines up to `step` start this run's metrics.jsonl, so the
    branch reads like one run. Model, batch and data must be the source's, but for how the
    model is computed (config.COMPUTE_FIELDS: a branch may run on other hardware)."""
    source = read_run(source_dir)
    changed = [f"{part}.{f}" for part in ("model", "batch", "data")
               for f in _differing(getattr(source, part), getattr(self.run, part))
               if not (part == "model" and f in COMPUTE_FIELDS)]
    if changed:
      raise ConfigError(f"TrainConfig.branch_from={source_dir} trains another model, batch or "
                        f"data ({', '.join(changed)} differ); a branch changes only the "
                        f"schedule and length, so use that run's settings.")
    ckpts = checkpoint.Checkpoints(os.path.join(source_dir, "checkpoints"), every=1, keep=1)
    try:
      saved = ckpts.manager.all_steps()
      step = ckpts.latest_step() if step is None else step
      if step is None or step not in saved:
        raise RunNotFound(f"TrainConfig.branch_step={step}: {source_dir} has checkpoints at "
                          f"steps {sorted(saved)}; branch from one of them (a source run keeps "
                          f"the steps listed in its TrainConfig.keep_steps).")
      if step >= self.run.train.train_steps:
        raise ConfigError(f"TrainConfig.branch_step={step} leaves nothing to train: the branch "
                          f"ends at train_steps={self.run.train.train_steps}; branch earlier.")
      state, data_state = ckpts.restore(self.abstract, step, self.run.to_dict())
    finally:
      ckpts.close()
    if jax.process_index() == 0:
      lines = [json.dumps(r) + "\n" for r in read_metrics(source_dir) if r["step"] <= step]
      write_atomic(os.path.join(self.model_dir, "metrics.jsonl"), "".join(lines))
    self.say(f"continuing {source_dir} from its step {step} (weights, optimizer, data position)")
    return state, data_state, step

  def warm_start_params(self, source_dir):
    """The latest weights of source_dir's run, in this run's shardings and parameter dtype
    (its optimizer state is not read). Its parameters must have this run's shapes; the
    rest of ModelConfig may differ (a causal model adapted to prefix LM, dropout added)."""
    source = read_run(source_dir)
    changed = _differing(source.model, self.run.model)
    try:
      params, step = self.restore_params(source_dir)
    except checkpoint.CheckpointMismatch as e:
      raise ConfigError(f"TrainConfig.init_from={source_dir} holds a model of other shapes "
                        f"(ModelConfig {', '.join(changed)} differ); start from a run whose "
                        f"parameters have this run's shapes.") from e
    except RunNotFound as e:
      raise RunNotFound(f"TrainConfig.init_from={source_dir} has no checkpoint yet; train it "
                        f"first.") from e
    anew = f"; ModelConfig {', '.join(changed)} set anew" if changed else ""
    self.say(f"starting from the weights of {source_dir} (step {step}); optimizer, data and "
             f"schedule start afresh{anew}")
    return params

  def evaluate(self, params):
    """An eval line: the losses of the eval sets and the scores of TrainConfig.eval_tasks."""
    out = held_out.evaluate(self.eval_step, params, self.eval_sets, self.mesh,
                             self.run.batch.micro_batch_size)
    if self.task_eval is not None:
      if self.scorer is None:  # made at the first evaluation, once the vocabulary is written
        from bigsci_jax.likelihood import Scorer
        self.scorer = Scorer(self.model, {}, read_tokenizer(self.model_dir),
                             self.run.batch.seq_len, self.run.batch.micro_batch_size, self.mesh)
      self.scorer.params = params
      out.update(self.task_eval.scores(self.scorer))
    return out

  def say(self, line):
    """One line on the terminal (process 0), above the progress bar."""
    if jax.process_index() == 0:
      tqdm.tqdm.write(line, file=sys.stderr)

  def batch_rows(self, state, step, current, tokens_seen):
    """The global batch (sequences) of `step`, a pure function of the state before it: the
    linear ramp's size at tokens_seen, or the 'gns' schedule's (which reads the device
    state only at its adaptation steps and on the first step of a run)."""
    cfg = self.run.batch
    if cfg.schedule == "linear":
      return data.batch_size_at(cfg, tokens_seen)
    if current is None:  # a fresh run: 0 -> the smallest batch; resumed: the last step's
      current = max(int(jax.device_get(state.batch_rows)), cfg.warmup_start)
    if step == 0 or step % cfg.gns_adapt_every:
      return current
    noise = jax.device_get(state.noise)
    return data.gns_batch_size(cfg, current, float(noise.b_simple()), float(noise.tokens_per_row))

  def _too_many_skips(self, step, reason, loss, first_skip):
    """After max_skips skips in a row: the checkpoint step to roll back to, or raise.

    The target is the newest checkpoint older than the last update applied before the
    streak (that update may be what broke the weights)."""
    train_cfg = self.run.train
    self.ckpts.wait()
    last = self.ckpts.latest_step()
    before = [s for s in self.ckpts.manager.all_steps() if s <= first_skip - 2]
    target = max(before) if before else None
    if train_cfg.on_max_skips == "rollback" and target is not None and target != self.rolled_back_to:
      return target
    resume = (f"the last checkpoint is step {last} in {self.model_dir}" if last is not None
              else "no checkpoint was saved yet")
    again = (f" after a rollback to step {target}" if target is not None
             and target == self.rolled_back_to else "")
    self.writer.write(step, "event", {"event": "abort", "reason": steps.SKIP_REASONS[reason]})
    raise TrainingError(
        f"the update was skipped {train_cfg.max_skips} times in a row{again}, up to step {step} "
        f"({steps.SKIP_REASONS[reason]}, loss {loss:.4g}; {resume}): lower "
        f"OptimizerConfig.learning_rate or set OptimizerConfig.clip_norm, then run again.")

  def _rollback(self, state, to_step, step, writer):
    """The state of checkpoint `to_step` with this step's counter: data and schedule go on."""
    restored, _ = self.ckpts.restore(self.abstract, to_step)
    writer.write(step, "event", {"event": "rollback", "to_step": to_step})
    self.say(f"step {step}: {self.run.train.max_skips} updates skipped in a row; weights and "
             f"optimizer state rolled back to step {to_step}, the data goes on")
    self.rolled_back_to = to_step
    # the data and the LR schedule go on; batches never shrink
    return restored.replace(step=state.step, batch_rows=state.batch_rows, rows_seen=state.rows_seen)

  def run_loop(self):
    run, cfg_batch = self.run, self.run.batch
    state, start = self.restore_or_init()
    writer = self.writer = MetricsWriter(self.model_dir, resume_step=start)
    tokens_seen = self.source.position * cfg_batch.seq_len
    total = run.train.train_steps
    bar = tqdm.tqdm(total=total, initial=start, disable=not self.progress or jax.process_index() != 0,
                    dynamic_ncols=True, desc="train")
    pending, last_time, summary = None, time.perf_counter(), {"step": start}
    self.rolled_back_to, self.streak, quiet_until, rollback = None, 0, 0, None

    def flush(pending):
      """Log a dispatched step once its metrics are here; returns a checkpoint step to roll
      back to, or None."""
      nonlocal last_time
      step, metrics, rows, tokens, watch = pending
      layers = metrics.get("layers")  # fetched only on the steps that log them
      values = jax.device_get({k: v for k, v in metrics.items() if k != "layers"})
      now = time.perf_counter()
      step_time, last_time = now - last_time, now
      loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
      reason, in_a_row = int(values["skip_reason"]), int(values["skips_in_a_row"])
      bar.update(1)
      self.streak = in_a_row
      if layers is not None and (watch or reason):
        writer.write(step, "watch", jax.device_get(layers))  # the step computed them
      if reason:
        writer.write(step, "event", {"event": "skipped_update", "reason": steps.SKIP_REASONS[reason],
                                     "loss": loss, "grad_norm": grad_norm, "in_a_row": in_a_row})
        self.say(f"step {step}: update skipped ({steps.SKIP_REASONS[reason]}: loss {loss:.4g}, "
                 f"gradient norm {grad_norm:.4g}), {in_a_row} in a row")
        if in_a_row >= run.train.max_skips and step > quiet_until:
          return self._too_many_skips(step, reason, loss, step - in_a_row + 1)
        return None
      batch_tokens = rows * cfg_batch.seq_len
      tokens_per_s = batch_tokens / step_time
      flops_per_s = tokens_per_s * self.flops_per_token
      row = {"loss": loss, "learning_rate": float(values["learning_rate"]),
             "grad_norm": grad_norm, "batch_tokens": batch_tokens,
             "tokens_seen": tokens, "flops_seen": tokens * self.flops_per_token,
             "step_time_s": step_time, "tokens_per_s": tokens_per_s,
             "mfu": flops_per_s / self.peak_total if self.peak_total else None}
      for key in ("gns", "gns_g2", "gns_trace"):  # NaN (logged null) until first measured
        if key in values:
          row[key] = float(values[key])
      if step % run.train.log_every == 0 or step == total:
        writer.write(step, "train", row)
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      summary.update(step=step, loss=loss)
      return None

    def traced(window):
      if window is not None:
        first, last, folder = window
        writer.write(last, "event", {"event": "profile", "steps": [first, last], "dir": folder})
        self.say(f"steps {first}-{last} traced in {folder}: tensorboard --logdir "
                 f"{self.model_dir} shows them (Profile tab, tensorboard-plugin-profile)")

    profile = profiler.StepProfiler(self.model_dir, start + run.train.profile_skip + 1,
                                    run.train.profile_steps, total)
    previous_handler = preemption.install(run.train.preemption_grace_s, self.say)
    try:
      if run.train.eval_at_start and start == 0:  # the "before" of continued pretraining
        writer.write(0, "eval", self.evaluate(state.params))
      rows = None
      for s in range(start, total):
        with profile.step(s + 1, state):
          rows = self.batch_rows(state, s, rows, tokens_seen)
          accumulation, micro = rows // cfg_batch.micro_batch_size, cfg_batch.micro_batch_size
          if run.train.gns_every and accumulation == 1 and s % run.train.gns_every == 0:
            accumulation, micro = 2, micro // 2  # two half batches: a noise-scale sample
          host = data.split_micro_batches(self.source.take(rows), accumulation)
          batch = data.to_global(host, self.batch_sharding, micro)
          watch = bool(run.train.watch_every) and (s + 1) % run.train.watch_every == 0
          state, metrics = self.train_step(state, batch, watch)
        traced(profile.finish(s + 1, state))
        tokens_seen += rows * cfg_batch.seq_len
        if pending is not None:
          rollback = flush(pending)
        pending = (s + 1, metrics, rows, tokens_seen, watch)
        done = s + 1
        stop = preemption.reached(done)
        eval_due = run.train.eval_every and done % run.train.eval_every == 0 and done < total
        # The last step is saved after the final evaluation, so a saved final step
        # always has its eval line.
        save_due = (self.ckpts.due(done) and done < total) or stop
        if eval_due or save_due or rollback is not None:
          # A state is evaluated or saved only once its step is known to be good.
          if rollback is not None:
            quiet_until = done  # this step ran on the streak's state: it rolls back too
          again = flush(pending)
          rollback, pending = (again if rollback is None else rollback), None
        if rollback is not None:
          state = self._rollback(state, rollback, done, writer)
          quiet_until, rollback = done, None
          continue
        if eval_due:
          writer.write(done, "eval", self.evaluate(state.params))
        if save_due and (self.streak == 0 or stop):  # no scheduled save inside a skip streak
          self.ckpts.save(done, state, self.source.get_state(), run.to_dict())
        if stop:
          self.ckpts.wait()
          writer.write(done, "event", {"event": "preempted"})
          self.say(f"step {done}: stopped on SIGTERM; saved step {done} in {self.model_dir}, "
                   f"the next start resumes there")
          summary.update(step=done, preempted=True)
          break
      else:
        rollback = flush(pending) if pending is not None else None
        if rollback is not None:
          state = self._rollback(state, rollback, total, writer)
        if start < total:
          final = self.evaluate(state.params)
          writer.write(total, "eval", final)
          summary["eval_loss"] = final["loss"]
          summary.update({k: v for k, v in final.items() if k.startswith("bpb")})
        self.ckpts.save(int(jax.device_get(state.step)), state, self.source.get_state(),
                        run.to_dict())
        self.ckpts.wait()
    finally:
      traced(profile.close())
      preemption.uninstall(previous_handler)
      bar.close()
      writer.close()
      self.ckpts.close()
    summary["state"] = state
    return summary


def train(run: RunConfig, model_dir, *, config_text="", progress=True):
  """Train `run` in model_dir, resuming from its latest checkpoint if there is one.

  Returns a summary dict: last `step`, its train `loss`, the final `eval_loss`
  and the final train `state`.
  """
  return _Trainer(run, model_dir, config_text, progress).run_loop()
