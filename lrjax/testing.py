"""What lrjax's tests share: tiny models, checkpoints and tokenizers, documents, launching several JAX
processes, and a gs:// that lives in memory.

Multi-process runs are real: `launch` starts N copies of an experiment on this machine, each its own JAX
process with its own simulated CPU devices, connected through jax.distributed with a localhost coordinator and
gloo collectives (lrjax.cli's --coordinator/--num_processes/--process_id/--cpu_devices flags).

`fake_gcs()` serves gs:// from memory through both routes a real bucket is reached by: etils.epath's fsspec
backend (every lrjax read and write, orbax's metadata files) and tensorstore's GCS driver (orbax's array data),
which speaks the GCS JSON API over HTTP to a server on localhost. One object store backs both.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from typing import Iterator, Sequence

import fsspec
import jax
import numpy as np
import tokenizers as tk
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem

from lrjax import model, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
            head_dim=16, max_position_embeddings=64, block_q=64, block_k=64)


def tiny_config(**overrides):
  """A tiny byte-vocabulary LLaMA (GQA 2:1, 8 rotary pairs, window 64)."""
  return model.ModelConfig(**{**TINY, **overrides})


def save_tiny_hf(path, seed: int = 0, **overrides) -> str:
  """A random tiny model saved as a Hugging Face directory at `path`; returns the path."""
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


def word_tokenizer(path, words: Sequence[str]) -> str:
  """A Hugging Face WordLevel tokenizer.json at `path` (ids: <unk> 0, <s> 1, </s> 2, then `words`), whose
  post-processor adds <s> and </s>; returns the path (a tokenizer spec)."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
  tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
  tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A </s>",
                                                        special_tokens=[("<s>", 1), ("</s>", 2)])
  tok.save(str(path))
  return str(path)


# ----------------------------------------------------------------------------------------------------------
# gs:// in memory.


class InMemoryGcs(MemoryFileSystem):
  """fsspec's memory filesystem under the gs:// protocol, naming objects "bucket/path" as gcsfs does (epath's
  fsspec backend prepends the protocol to what glob returns). Every open for reading gets its own handle."""

  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs: list = [""]

  @classmethod
  def _strip_protocol(cls, path) -> str:
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")

  def _open(self, path, mode="rb", **kwargs):
    key = self._strip_protocol(path)
    if mode == "rb" and key in self.store:
      return io.BytesIO(self.store[key].getvalue())
    return super()._open(path, mode, **kwargs)


def _generation(data: bytes) -> int:
  """An object's generation: a hash of its bytes (> 0; 0 means "absent" in preconditions), so objects written
  through fsspec have one too and every rewrite with new bytes gets a new one."""
  return int.from_bytes(hashlib.sha256(data).digest()[:7], "big") + 1


class _GcsJsonApi(http.server.BaseHTTPRequestHandler):
  """What tensorstore's gcs driver calls, over InMemoryGcs: media download (byte ranges, generation
  preconditions), media upload (ifGenerationMatch), delete and list."""

  protocol_version = "HTTP/1.1"
  fs = InMemoryGcs()

  def log_message(self, *args) -> None:
    pass

  def _reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
    self.send_response(code)
    for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _parse(self) -> tuple[str, dict]:
    url = urllib.parse.urlsplit(self.path)
    return url.path, dict(urllib.parse.parse_qsl(url.query))

  def _object(self, bucket: str, name: str) -> tuple[str, bytes | None]:
    key = f"{bucket}/{name}"
    return key, self.fs.store[key].getvalue() if key in self.fs.store else None

  def _resource(self, name: str, data: bytes) -> bytes:
    return json.dumps({"name": name, "generation": str(_generation(data)), "size": str(len(data))}).encode()

  def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
    path, query = self._parse()
    if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path):
      name = urllib.parse.unquote(m[2])
      _, data = self._object(m[1], name)
      if data is None:
        return self._reply(404, b'{"error": {"code": 404}}')
      generation = _generation(data)
      if query.get("ifGenerationNotMatch") == str(generation):
        return self._reply(304, headers={"x-goog-generation": str(generation)})
      if query.get("ifGenerationMatch", str(generation)) != str(generation):
        return self._reply(412)
      if query.get("alt") != "media":
        return self._reply(200, self._resource(name, data))
      headers = {"x-goog-generation": str(generation), "Content-Type": "application/octet-stream"}
      if rng := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
        a, b = int(rng[1]), int(rng[2]) if rng[2] else len(data) - 1
        headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
        return self._reply(206, data[a:b + 1], headers)
      return self._reply(200, data, headers)
    if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path):
      bucket, prefix, start, end = f"{m[1]}/", query.get("prefix", ""), query.get("startOffset", ""), \
          query.get("endOffset")
      names = sorted(k[len(bucket):] for k in tuple(self.fs.store) if k.startswith(bucket))
      items = [json.loads(self._resource(n, self.fs.store[bucket + n].getvalue())) for n in names
               if n.startswith(prefix) and n >= start and (not end or n < end)]
      return self._reply(200, json.dumps({"items": items}).encode())
    self._reply(404)

  def do_POST(self) -> None:  # noqa: N802
    path, query = self._parse()
    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
    if not m or query.get("uploadType") != "media":
      return self._reply(400)
    key, old = self._object(m[1], query["name"])
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != (0 if old is None else
                                                                            _generation(old)):
      return self._reply(412)
    self.fs.pipe_file(key, body)
    self._reply(200, self._resource(query["name"], body))

  def do_DELETE(self) -> None:  # noqa: N802
    path, query = self._parse()
    m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)
    key, data = self._object(m[1], urllib.parse.unquote(m[2])) if m else ("", None)
    if data is None:
      return self._reply(404)
    if query.get("ifGenerationMatch", str(_generation(data))) != str(_generation(data)):
      return self._reply(412)
    self.fs.rm_file(key)
    self._reply(204)


_SERVER: list = []  # one server per process: tensorstore may read its endpoint once


@contextlib.contextmanager
def fake_gcs() -> Iterator[InMemoryGcs]:
  """gs:// (any bucket) served from memory for the duration, empty at the start; yields the filesystem.

  epath reaches it through fsspec (registered for "gs"/"gcs"); tensorstore (orbax's arrays) through
  TENSORSTORE_GCS_HTTP_URL pointing at a localhost server of the GCS JSON API, with a fixed test token. Orbax
  asks google-cloud-storage whether a bucket has a hierarchical namespace; that one call is answered here
  (flat, as this store is), so the library need not be installed.
  """
  from orbax.checkpoint._src.path import gcs_utils  # private orbax module: imported only when faking GCS

  if not _SERVER:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GcsJsonApi)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _SERVER.append(server)
  env = {"TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{_SERVER[0].server_address[1]}",
         "TENSORSTORE_GCS_HTTP_VERSION": "1.1", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "lrjax-test"}
  saved_env = {k: os.environ.get(k) for k in env}
  saved_bucket = gcs_utils.get_bucket
  for protocol in InMemoryGcs.protocol:
    fsspec.register_implementation(protocol, InMemoryGcs, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  InMemoryGcs.store.clear()
  InMemoryGcs.pseudo_dirs[:] = [""]
  os.environ.update(env)
  gcs_utils.get_bucket = lambda name: type("FlatBucket", (), {"hierarchical_namespace_enabled": False})()
  try:
    yield InMemoryGcs()
  finally:
    gcs_utils.get_bucket = saved_bucket
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    InMemoryGcs.store.clear()
    backend.fsspec_backend._get_filesystem.cache_clear()
