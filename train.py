"""Train a bigsci_jax model: the command line, and the only Python file that knows gin.

  python train.py [--gin_file=F ...] [--gin.NAME=VALUE ...] [--model_dir=DIR]

With no --gin_file it runs the embedded default (gin/runs/default.gin). When
--model_dir already holds a run, its saved config.gin is the base config and the
flags override it, so `python train.py --model_dir=DIR` continues that run.
Gin files are looked up as given, then under this repository's gin/ folder.
Several processes outside a TPU pod / SLURM: --coordinator_address,
--num_processes and --process_id go to jax.distributed.initialize().
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

import gin


class _QuietSearchPath(logging.Filter):
  """gin logs an ERROR for every search-path prefix an include is not under."""

  def filter(self, record):
    return not str(record.msg).startswith("Path not found")


logging.getLogger().addFilter(_QuietSearchPath())

GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gin")
DEFAULT_GIN = "runs/default.gin"
DEFAULT_MODEL_DIR = os.path.join("runs", "default")


_REGISTERED = {}


def _configurables():
  """The config dataclasses, registered with gin once per process."""
  if not _REGISTERED:
    from bigsci_jax import config
    for cls in (config.ModelConfig, config.OptimizerConfig, config.BatchConfig,
                config.MeshConfig, config.DataConfig, config.TrainConfig):
      _REGISTERED[cls] = gin.external_configurable(cls, name=cls.__name__)
  return _REGISTERED


def split_gin_bindings(argv):
  """(['NAME=VALUE' of every --gin.NAME=VALUE], the other arguments)."""
  return ([a[len("--gin."):] for a in argv if a.startswith("--gin.")],
          [a for a in argv if not a.startswith("--gin.")])


def parse_flags(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--model_dir", default=None)
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--multihost", action="store_true",
                      help="join a TPU pod / cluster that jax.distributed detects itself")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
  gin_bindings, rest = split_gin_bindings(argv)
  flags = parser.parse_args(rest)
  flags.gin_bindings = gin_bindings
  return flags


def _resolve(path):
  if os.path.exists(path):
    return path
  candidate = os.path.join(GIN_DIR, path)
  if os.path.exists(candidate):
    return candidate
  raise FileNotFoundError(f"gin file {path!r} was found neither as given nor under {GIN_DIR}/; "
                          f"pass an existing --gin_file.")


def _search_gin_dir_first():
  """Includes ('runs/cpu_smoke.gin') are looked up in the library's gin/ before the
  working directory. Looked up there first, gin's Python-path check crashes on a
  directory named like a gin folder (runs/ once a run wrote runs/default/: a
  namespace package without a file). gin 0.5-0.6 only appends search paths; its
  list is reordered here."""
  prefixes = gin.config._LOCATION_PREFIXES
  if GIN_DIR in prefixes:
    prefixes.remove(GIN_DIR)
  prefixes.insert(0, GIN_DIR)


def build_config(gin_files, bindings, base_config_text=None):
  """Parse gin files and bindings; return (RunConfig, operative config text)."""
  from bigsci_jax.config import ConfigError, RunConfig
  registered = _configurables()
  gin.clear_config()
  _search_gin_dir_first()
  files = [_resolve(f) for f in gin_files]
  try:
    if base_config_text:
      gin.parse_config(base_config_text)
    gin.parse_config_files_and_bindings(files, bindings)
  except (ValueError, SyntaxError) as e:  # unknown parameter, malformed binding or file
    raise ConfigError(f"bad gin configuration: {str(e).splitlines()[0]}") from e

  def plain(cls):  # gin's subclass -> the library's own frozen dataclass
    configured = registered[cls]()
    return cls(**{f.name: getattr(configured, f.name) for f in dataclasses.fields(cls)})

  run = RunConfig(**{f.name: plain(f.type) for f in dataclasses.fields(RunConfig)})
  return run, gin.config_str()


def main(argv):
  flags = parse_flags(argv)
  model_dir = flags.model_dir or DEFAULT_MODEL_DIR
  saved = os.path.join(model_dir, "config.gin")
  base = open(saved).read() if os.path.exists(saved) else None
  gin_files = flags.gin_file or ([] if base else [DEFAULT_GIN])
  from bigsci_jax import loop, sharding
  from bigsci_jax.checkpoint import CheckpointMismatch
  from bigsci_jax.config import ConfigError
  from bigsci_jax.corpus import CorpusError
  try:
    run, config_text = build_config(gin_files, flags.gin_bindings, base)
    sharding.maybe_initialize_distributed(flags.coordinator_address, flags.num_processes,
                                          flags.process_id, flags.multihost)
    summary = loop.train(run, model_dir, config_text=config_text,
                         progress=not flags.no_progress)
  except (ConfigError, CorpusError, FileNotFoundError, loop.TrainingError, loop.RunNotFound,
          CheckpointMismatch) as e:
    if flags.verbose:
      raise
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  summary.pop("state", None)
  languages = sorted(k.split("/", 1)[1] for k in summary if k.startswith("bpb/"))
  if languages:
    print("validation bits per UTF-8 byte: " + ", ".join(
        f"{lang} {summary['bpb/' + lang]:.3f}" for lang in languages) + f"; all {summary['bpb']:.3f}")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
