"""What lrjax's tests share: tiny models and checkpoints, documents, and launching several JAX processes.

Multi-process runs are real: `launch` starts N copies of an experiment on this machine, each its own JAX
process with its own simulated CPU devices, connected through jax.distributed with a localhost coordinator and
gloo collectives (lrjax.cli's --coordinator/--num_processes/--process_id/--cpu_devices flags).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
            head_dim=16, max_position_embeddings=64, block_q=64, block_k=64)


def tiny_config(**overrides):
  """A tiny byte-vocabulary LLaMA (GQA 2:1, 8 rotary pairs, window 64)."""
  from lrjax import model
  return model.ModelConfig(**{**TINY, **overrides})


def save_tiny_hf(path, seed: int = 0, **overrides) -> str:
  """A random tiny model saved as a Hugging Face directory at `path`; returns the path."""
  import jax
  from lrjax import model, weights
  cfg = tiny_config(**overrides)
  weights.save_hf(path, cfg, jax.tree.map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(seed))))
  return str(path)


def random_documents(lengths: Sequence[int], *, vocab: int = 256, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_command(script: str, args: Sequence[str], *, process_id: int, num_processes: int, port: int,
                    devices: int) -> list[str]:
  """`script` is experiments/SCRIPT, or any path to a Python file taking the same flags."""
  multi = [f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={process_id}"]
  path = script if os.path.isabs(script) else os.path.join(ROOT, "experiments", script)
  return [sys.executable, path, *args, *(multi if num_processes > 1 else []), f"--cpu_devices={devices}"]


def start(script: str, args: Sequence[str], *, num_processes: int, devices: int,
          per_process: Sequence[Sequence[str]] | None = None) -> list[subprocess.Popen]:
  """Starts `num_processes` processes of experiments/SCRIPT (each `devices` simulated CPU devices)."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH="", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # --cpu_devices sets it per process
  procs = []
  for i in range(num_processes):
    extra = list(per_process[i]) if per_process else []
    procs.append(subprocess.Popen(process_command(script, [*args, *extra], process_id=i,
                                                  num_processes=num_processes, port=port, devices=devices),
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def wait(procs: Sequence[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of every process; all are killed if one times out."""
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


def launch(script: str, args: Sequence[str], *, num_processes: int, devices: int, timeout: float = 600,
           per_process: Sequence[Sequence[str]] | None = None) -> list[tuple[int, str, str]]:
  """start + wait; raises AssertionError with every process's stderr tail when one fails."""
  results = wait(start(script, args, num_processes=num_processes, devices=devices, per_process=per_process),
                 timeout)
  failed = [(i, r) for i, r in enumerate(results) if r[0] != 0]
  if failed:
    raise AssertionError("\n".join(f"process {i} exited {r[0]}:\n{r[2][-3000:]}" for i, r in failed))
  return results
