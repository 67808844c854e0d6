"""RULER (Hsieh et al. 2024) task generation: the 13 tasks' registry and exact-length prompts.

Families and RULER's task names (scripts/synthetic.yaml; templates, answer prefixes, tokens_to_generate and
metrics from scripts/data/synthetic/constants.py and scripts/eval/synthetic/constants.py):

  niah  niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery   "One of the special magic
        {numbers} for {key} is: {value}." needles in noise, essays (caller documents) or other needles
  vt    variable tracking: a chain `VAR A = 12345`, `VAR B = VAR A`, ...; name every variable equal to the value
  cwe   common words: a numbered list in which 10 words repeat more often than the rest
  fwe   frequent words: coded words drawn from a Zipf distribution; name the three most frequent
  qa    qa_1 (SQuAD), qa_2 (HotpotQA): gold paragraphs among distractors; the caller supplies the records

`generate` builds one sample whose prompt is exactly `length - max_new_tokens` tokens (BOS included when the
tokenizer adds one), so prompt plus answer fill `length`: RULER's rule (the input, template included, is fit to
max_seq_length minus tokens_to_generate), made exact. The prompt is assembled from separately encoded pieces:
BOS, the text before the context, the context (filled at the token level, see lrjax.haystack), and the text after
it (question and answer prefix). Each sample draws everything from a generator seeded with
(seed, task, length, index), so any sample can be rebuilt alone.

Departures from RULER's scripts, all for exact lengths or determinism: needle depths come from RULER's
40-point depth grid for every haystack type (RULER draws uniform sentence indices for noise haystacks); the last
filler sentence is cut at a token boundary; the cwe, fwe and qa contexts are the largest RULER context that
fits, completed by extra count-1 words (cwe), dots (fwe) or the start of one more distractor document (qa);
shuffles use the sample's generator (RULER reuses one fixed seed for every sample); essays are split into
sentences by punctuation rather than nltk.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import string
import zlib
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from scipy import special

from lrjax import haystack as hs
from lrjax.ruler.prompts import DOCUMENT, NEEDLE, TEMPLATES, FormatPrompt, LengthError, RulerError, plain_prompt

_MARKER = "\x00RULER-CONTEXT\x00"  # stands for the context while the prompt text is formatted
_SPARE_WORDS = 64  # cwe: unused words kept aside to complete a list that falls short of the budget
_VT_EXAMPLE_TOKENS = 500  # RULER sizes its variable-tracking in-context example to 500 tokens


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """One RULER task: its family's builder is called with `params` (RULER's argument names)."""
  name: str
  family: str  # niah | vt | cwe | fwe | qa
  group: str  # retrieval | multi_hop | aggregation | qa
  max_new_tokens: int  # RULER's tokens_to_generate
  metric: str  # string_match_all | string_match_part
  params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Sample:
  """One prompt: tokens i32[length - max_new_tokens] and the strings a correct answer contains."""
  task: str
  length: int
  tokens: np.ndarray
  outputs: list[str]
  max_new_tokens: int
  metric: str
  depth: float | None  # single-needle tasks: filler tokens before the needle / filler tokens
  metadata: dict


_FAMILIES = {"niah": ("retrieval", 128, "string_match_all"), "vt": ("multi_hop", 30, "string_match_all"),
             "cwe": ("aggregation", 120, "string_match_all"), "fwe": ("aggregation", 50, "string_match_all"),
             "qa": ("qa", 32, "string_match_part")}


def task_config(name: str, family: str, **params) -> TaskConfig:
  """A TaskConfig with the family's RULER group, tokens_to_generate and metric."""
  if family not in _FAMILIES:
    raise RulerError(f"task {name!r}: unknown family {family!r}; expected one of {', '.join(_FAMILIES)}")
  return TaskConfig(name, family, *_FAMILIES[family], params)


def _niah(name, haystack, key, value, k=1, v=1, q=1):
  return task_config(name, "niah", type_haystack=haystack, type_needle_k=key, type_needle_v=value,
                     num_needle_k=k, num_needle_v=v, num_needle_q=q)


TASKS: dict[str, TaskConfig] = {t.name: t for t in [
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", q=4),
    task_config("vt", "vt", type_haystack="noise", num_chains=1, num_hops=4),
    task_config("cwe", "cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    task_config("fwe", "fwe", alpha=2.0),
    task_config("qa_1", "qa", dataset="squad"),
    task_config("qa_2", "qa", dataset="hotpotqa"),
]}


def select(names: str | Sequence[str]) -> list[TaskConfig]:
  """Tasks by name: "all", a comma-separated string, or a sequence of names (registry order for "all")."""
  if isinstance(names, str):
    names = list(TASKS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown or not names:
    raise RulerError(f"unknown RULER task(s) {', '.join(map(repr, unknown)) or '(none given)'}; expected "
                     f"\"all\" or names from {', '.join(TASKS)}")
  return [TASKS[n] for n in names]


def takes_depth(task: TaskConfig) -> bool:
  """Whether a needle depth can be given: a niah task with exactly one needle (one key, one value)."""
  p = task.params
  return task.family == "niah" and max(p["num_needle_k"], p["num_needle_q"]) * p["num_needle_v"] == 1


def needs_documents(task: TaskConfig) -> bool:
  """Whether the task's haystack is documents (RULER's essays), which the caller passes as `haystack`."""
  return task.params.get("type_haystack") == "essay"


def sample_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
  """The generator of one sample: a function of (seed, task, length, index) only."""
  return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


class _Request(NamedTuple):
  config: TaskConfig
  tokenizer: Any
  rng: np.random.Generator
  length: int
  index: int
  format_prompt: FormatPrompt
  haystack: Sequence[str] | None
  qa_records: Sequence[Mapping] | None
  depth: float | None
  add_bos: bool


def generate(task: str | TaskConfig, tokenizer, *, length: int, seed: int, index: int,
             haystack: Sequence[str] | None = None, qa_records: Sequence[Mapping] | None = None,
             format_prompt: FormatPrompt | None = None, depth: float | None = None,
             add_bos: bool | None = None) -> Sample:
  """One sample of `task` whose prompt is exactly `length - max_new_tokens` tokens.

  Args:
    tokenizer: encode(text) -> i32[n] (no special tokens), decode(ids) -> str, bos_id (int or None).
    haystack: document strings for essay haystacks (niah_single_2/3, multikey_1, multivalue, multiquery), in
      order, cycled if short; other tasks ignore it.
    qa_records: for qa tasks, dicts {"question": str, "answers": [str, ...], and "context": str or
      "paragraphs": [str, ...]}; sample `index` asks record index % len(records), the other records'
      paragraphs are the distractors.
    format_prompt: (task_text, answer_prefix) -> prompt text, e.g. prompts.model_template(CHATML); default plain.
    depth: single-needle niah tasks only: the needle's depth in [0, 1] instead of a random one.
    add_bos: start the prompt with tokenizer.bos_id; None: when the tokenizer adds one to model input
      (tokenizer.add_bos, the checkpoint's rule: SmolLM2 adds none). Chat prompts pass False (prompts.chat_prompt).
  """
  config = task if isinstance(task, TaskConfig) else select([task])[0]
  for arg, value, low in (("length", length, 1), ("seed", seed, 0), ("index", index, 0)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise RulerError(f"{arg} must be an integer >= {low}, got {value!r}")
  if depth is not None and (config.family != "niah" or not isinstance(depth, (int, float))
                            or not 0.0 <= depth <= 1.0):
    raise RulerError(f"depth={depth!r}: only niah tasks take a depth, a fraction in [0, 1]")
  builder = _BUILDERS.get(config.family)
  if builder is None:
    raise RulerError(f"task {config.name!r}: unknown family {config.family!r}; expected one of {', '.join(_BUILDERS)}")
  bos = getattr(tokenizer, "bos_id", None)
  if add_bos is None:
    add_bos = getattr(tokenizer, "add_bos", bos is not None)
  elif add_bos and bos is None:
    raise RulerError(f"add_bos=True but tokenizer {tokenizer!r} has no BOS id")
  req = _Request(config, tokenizer, sample_rng(seed, config.name, int(length), int(index)), int(length),
                 int(index), format_prompt or plain_prompt, [haystack] if isinstance(haystack, str) else haystack,
                 qa_records, depth, bool(add_bos))
  try:
    inspect.signature(builder).bind(req, **config.params)
  except TypeError as e:
    raise RulerError(f"task {config.name!r}: params do not fit the {config.family} family ({e})") from None
  return builder(req, **config.params)


def _frame(req: _Request, task_text: str, answer_prefix: str, before: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(BOS + text before the context, text after it) as token ids; task_text holds _MARKER for the context."""
  text = before + req.format_prompt(task_text, answer_prefix)
  if text.count(_MARKER) != 1:
    raise RulerError("format_prompt must return its task_text unchanged inside the prompt, exactly once")
  head, tail = text.split(_MARKER)
  bos = np.asarray([req.tokenizer.bos_id] if req.add_bos else [], np.int32)
  return np.concatenate([bos, hs.encode(req.tokenizer, head)]), hs.encode(req.tokenizer, tail)


def _too_short(req: _Request, needed: int | str) -> LengthError:
  return LengthError(f"{req.config.name}: length {req.length} is too short for its template, context and "
                     f"{req.config.max_new_tokens} generated tokens (needs {needed})")


def _budget(req: _Request, head: np.ndarray, tail: np.ndarray, minimum: int) -> int:
  """Context tokens left by the prompt frame and the generated tokens; at least `minimum`."""
  budget = req.length - req.config.max_new_tokens - head.size - tail.size
  if budget < minimum:
    raise _too_short(req, f"at least {req.length - budget + minimum} tokens")
  return budget


def _sample(req: _Request, head, context, tail, outputs, depth=None, **metadata) -> Sample:
  tokens = np.concatenate([head, context, tail]).astype(np.int32)
  return Sample(req.config.name, req.length, tokens, list(outputs), req.config.max_new_tokens, req.config.metric,
                depth, dict(metadata, context_start=int(head.size), context_tokens=int(context.size)))


def _documents(req: _Request) -> Sequence[str]:
  if not req.haystack:
    raise RulerError(f"{req.config.name} uses an essay haystack: pass haystack=[document strings] "
                     "(e.g. read with lrjax.data)")
  return req.haystack


def _filler(req: _Request, kind: str, sep: str):
  """The filler pieces of a noise or essay haystack."""
  if kind == "noise":
    return hs.repeat_pieces(req.tokenizer, hs.NOISE + sep)
  if kind == "essay":
    return hs.sentence_pieces(req.tokenizer, _documents(req), sep)
  raise RulerError(f"{req.config.name}: unknown type_haystack {kind!r}; expected noise, essay or needle")


def _needle_filler(req: _Request, key_type: str, value_type: str, keys: Sequence[str]):
  """RULER's "needle" haystack: needles whose keys are none of the real keys."""
  while True:
    key = hs.distinct_values(req.rng, key_type, 1, exclude=keys)[0]
    text = NEEDLE.format(type_needle_v=value_type, key=key, value=hs.random_value(req.rng, value_type))
    yield hs.encode(req.tokenizer, text + "\n")


def _singular(text: str) -> str:
  """RULER's rewording of the niah template when one value is asked for."""
  return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _depths(req: _Request, n: int) -> np.ndarray:
  return req.rng.choice(hs.DEPTHS, n, replace=n > len(hs.DEPTHS))


def _niah_sample(req: _Request, *, type_haystack: str, type_needle_k: str, type_needle_v: str,
                 num_needle_k: int, num_needle_v: int, num_needle_q: int) -> Sample:
  rng, num_keys = req.rng, max(num_needle_k, num_needle_q)
  keys = hs.distinct_values(rng, type_needle_k, num_keys)
  flat = hs.distinct_values(rng, type_needle_v, num_keys * num_needle_v)
  values = [flat[i * num_needle_v:(i + 1) * num_needle_v] for i in range(num_keys)]
  pairs = [(k, v) for k, vs in zip(keys, values) for v in vs]
  pairs = [pairs[i] for i in rng.permutation(len(pairs))]
  asked = [int(i) for i in rng.choice(num_keys, num_needle_q, replace=False)]
  queries = [keys[i] for i in asked]
  query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
  template, prefix = TEMPLATES["niah"]
  noun = type_needle_v
  if num_needle_q * num_needle_v == 1:
    template, prefix, noun = _singular(template), _singular(prefix), noun[:-1]
  sep = " " if type_haystack == "essay" else "\n"
  needles = [hs.encode(req.tokenizer, NEEDLE.format(type_needle_v=type_needle_v, key=k, value=v) + sep)
             for k, v in pairs]
  if req.depth is not None and len(pairs) != 1:
    raise RulerError(f"depth={req.depth!r}: {req.config.name} has {len(pairs)} needles; a depth needs one")
  depths = [req.depth] if req.depth is not None else _depths(req, len(pairs))
  answer_prefix = prefix.format(type_needle_v=noun, query=query)
  head, tail = _frame(req, template.format(type_needle_v=noun, context=_MARKER, query=query), answer_prefix)
  budget = _budget(req, head, tail, sum(n.size for n in needles))
  filler = (_needle_filler(req, type_needle_k, type_needle_v, keys) if type_haystack == "needle"
            else _filler(req, type_haystack, sep))
  context, starts, achieved = hs.haystack(filler, needles, depths, budget)
  return _sample(req, head, context, tail, [v for i in asked for v in values[i]],
                 depth=float(achieved[0]) if len(pairs) == 1 else None, answer_prefix=answer_prefix,
                 keys=keys, queries=queries, needle_offsets=(starts + head.size).tolist(),
                 depths=achieved.tolist())


def _chain(names: Sequence[str], value: int) -> list[str]:
  return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]


def _vt_example(req: _Request, num_hops: int) -> str:
  """RULER's in-context example: one 3-letter chain in as many noise lines as fit in 500 tokens, answered."""
  names = hs.random_names(req.rng, num_hops + 1, 3)
  value = int(req.rng.integers(10000, 99999))
  lines = _chain(names, value)
  template, prefix = TEMPLATES["vt"]
  text = lambda context: (template.format(context=context, query=value) +
                          prefix.format(num_v=num_hops + 1, query=value) + " " + " ".join(names) + "\n")
  spare = _VT_EXAMPLE_TOKENS - hs.encode(req.tokenizer, text("\n".join(lines))).size
  num_noise = max(0, spare // hs.encode(req.tokenizer, hs.NOISE + "\n").size)
  slots = set(req.rng.choice(num_noise + len(lines), len(lines), replace=False).tolist())
  chain = iter(lines)
  return text("\n".join(next(chain) if i in slots else hs.NOISE for i in range(num_noise + len(lines))))


def _vt_sample(req: _Request, *, type_haystack: str, num_chains: int, num_hops: int) -> Sample:
  rng = req.rng
  example = _vt_example(req, num_hops)
  names = hs.random_names(rng, num_chains * (num_hops + 1), 5)
  chains = [_chain(names[c * (num_hops + 1):(c + 1) * (num_hops + 1)], int(rng.integers(10000, 99999)))
            for c in range(num_chains)]
  query = chains[0][0].split(" = ")[1]
  sep = " " if type_haystack == "essay" else "\n"
  end = ". " if type_haystack == "essay" else "\n"
  needles = [hs.encode(req.tokenizer, line + end) for chain in chains for line in chain]
  depths = np.concatenate([np.sort(_depths(req, len(chain))) for chain in chains])
  template, prefix = TEMPLATES["vt"]
  answer_prefix = prefix.format(num_v=num_hops + 1, query=query)
  head, tail = _frame(req, example + "\n" + template.format(context=_MARKER, query=query), answer_prefix)
  budget = _budget(req, head, tail, sum(n.size for n in needles))
  context, starts, achieved = hs.haystack(_filler(req, type_haystack, sep), needles, depths, budget)
  return _sample(req, head, context, tail, names[:num_hops + 1], answer_prefix=answer_prefix, chains=chains,
                 needle_offsets=(starts + head.size).tolist(), depths=achieved.tolist())


def _numbered(words: Sequence[str], start: int = 1) -> str:
  return " ".join(f"{i}. {w}" for i, w in enumerate(words, start))


def _cwe_sample(req: _Request, *, freq_cw: int, freq_ucw: int, num_cw: int, num_fewshot: int = 1) -> Sample:
  short = req.length < 4096  # RULER's short-context setting: fewer repeats, a smaller example
  example_args, repeats = ((20, 3, 1), (6, 1)) if short else ((40, 10, 3), (freq_cw, freq_ucw))
  template, prefix = TEMPLATES["cwe"]
  shots = []
  for _ in range(num_fewshot):
    listed, common, _ = hs.word_list(req.rng, *example_args, num_cw, spare=0)
    shots.append(req.format_prompt(template.format(context=_numbered(listed)), prefix) + " " + _numbered(common))
  head, tail = _frame(req, template.format(context=_MARKER), prefix, "".join(s + "\n" for s in shots))
  budget = _budget(req, head, tail, 1)
  base = int(req.rng.integers(2**63))
  words = lambda n, compounds: hs.word_list(np.random.default_rng([base, n]), n, *repeats, num_cw, _SPARE_WORDS,
                                            compounds)
  for compounds, most in ((False, len(hs.WORDS)), (True, hs.NUM_COMPOUNDS)):
    build = lambda n: hs.encode(req.tokenizer, _numbered(words(n, compounds)[0]))
    found = hs.fit_count(build, budget, num_cw + 1, most - _SPARE_WORDS)
    if found is None:
      raise _too_short(req, f"a list of {num_cw + 1} words")
    if found[0] < most - _SPARE_WORDS:
      break
  else:
    raise RulerError(f"cwe: length {req.length} needs more distinct words than the {hs.NUM_COMPOUNDS} built in")
  n, tokens = found
  listed, common, spare = words(n, compounds)
  extra = (hs.encode(req.tokenizer, f" {i}. {w}") for i, w in enumerate(itertools.cycle(spare), len(listed) + 1))
  pad, _ = hs.fill(extra, budget - tokens.size)
  return _sample(req, head, np.concatenate([tokens, pad]), tail, common, answer_prefix=prefix, num_words=n)


def _fwe_sample(req: _Request, *, alpha: float, coded_wordlen: int = 6, vocab_size: int = -1) -> Sample:
  if vocab_size == -1:
    vocab_size = (req.length - req.config.max_new_tokens) // 50
  if vocab_size < 5:
    raise _too_short(req, "a vocabulary of 5 words, i.e. length >= 300")
  distinct: dict[str, None] = {}  # insertion-ordered set
  while len(distinct) < vocab_size:
    distinct["".join(req.rng.choice(list(string.ascii_lowercase), coded_wordlen))] = None
  vocab = ["..."] + list(distinct)[1:]  # the most frequent "word" is noise, as in RULER
  template, prefix = TEMPLATES["fwe"]
  head, tail = _frame(req, template.format(context=_MARKER), prefix)
  budget = _budget(req, head, tail, 0)
  weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -alpha / special.zeta(alpha)
  base = int(req.rng.integers(2**63))

  def build(n: int) -> np.ndarray:
    listed = np.repeat(np.asarray(vocab), (n * weights).astype(int))
    return hs.encode(req.tokenizer, " ".join(listed[np.random.default_rng([base, n]).permutation(listed.size)]))

  n, tokens = hs.fit_count(build, budget, 1)
  counts = (n * weights).astype(int)
  if counts[3] <= counts[4]:
    raise _too_short(req, "a coded text whose three most frequent words stand out")
  pad, _ = hs.fill(hs.repeat_pieces(req.tokenizer, " ..."), budget - tokens.size)
  return _sample(req, head, np.concatenate([tokens, pad]), tail, vocab[1:4], answer_prefix=prefix, num_words=n,
                 counts=dict(zip(vocab[:5], counts[:5].tolist())))


def record_paragraphs(record: Mapping, i: int) -> list[str]:
  """The gold paragraphs of a QA record, validated along with its question and answers."""
  if not isinstance(record, Mapping) or not isinstance(record.get("question"), str):
    raise RulerError(f"qa_records[{i}]: expected a dict with a 'question' string")
  answers = record.get("answers")
  if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) and a for a in answers):
    raise RulerError(f"qa_records[{i}]: 'answers' must be a non-empty list of non-empty strings")
  paragraphs = record.get("paragraphs", [record["context"]] if isinstance(record.get("context"), str) else None)
  if not isinstance(paragraphs, (list, tuple)) or not paragraphs or not all(isinstance(p, str) for p in paragraphs):
    raise RulerError(f"qa_records[{i}]: needs a 'context' string or a non-empty 'paragraphs' list of strings")
  return list(paragraphs)


def _qa_sample(req: _Request, *, dataset: str) -> Sample:
  records = req.qa_records
  if not records:
    raise RulerError(f"{req.config.name} ({dataset}) needs qa_records: dicts with question, answers and "
                     "context or paragraphs")
  paragraphs = [record_paragraphs(r, i) for i, r in enumerate(records)]
  record, gold = records[req.index % len(records)], paragraphs[req.index % len(records)]
  pool = sorted({p for ps in paragraphs for p in ps} - set(gold))
  if not pool:
    raise RulerError(f"{req.config.name}: qa_records hold no paragraph outside the gold ones to use as distractors")
  template, prefix = TEMPLATES["qa"]
  head, tail = _frame(req, template.format(context=_MARKER, query=record["question"]), prefix)
  budget = _budget(req, head, tail, 1)
  order = req.rng.permutation(len(pool))
  distractor = lambda j: pool[order[j % len(pool)]]  # cycled when the records run out, as RULER repeats
  base = int(req.rng.integers(2**63))

  def documents(n: int) -> list[str]:
    chosen = gold + [distractor(j) for j in range(n - len(gold))]
    return [chosen[i] for i in np.random.default_rng([base, n]).permutation(n)]

  join = lambda docs: "\n\n".join(DOCUMENT.format(i=i, document=d) for i, d in enumerate(docs, 1))
  found = hs.fit_count(lambda n: hs.encode(req.tokenizer, join(documents(n))), budget, len(gold))
  if found is None:
    raise _too_short(req, f"the {len(gold)} gold paragraph(s)")
  n, tokens = found
  extra = (hs.encode(req.tokenizer, "\n\n" + DOCUMENT.format(i=n + 1 + j, document=distractor(n - len(gold) + j)))
           for j in itertools.count())
  pad, _ = hs.fill(extra, budget - tokens.size)
  docs = documents(n)
  return _sample(req, head, np.concatenate([tokens, pad]), tail, record["answers"], answer_prefix=prefix,
                 record=req.index % len(records), num_documents=n,
                 gold_documents=[i for i, d in enumerate(docs, 1) if d in gold])


_BUILDERS = {"niah": _niah_sample, "vt": _vt_sample, "cwe": _cwe_sample, "fwe": _fwe_sample, "qa": _qa_sample}


def needle_grid(lengths: Sequence[int], depths: Sequence[float] | int) -> list[tuple[int, float]]:
  """(length, depth) cells of a needle-in-a-haystack grid, lengths outer; an int `depths` means linspace(0, 1)."""
  depths = np.linspace(0.0, 1.0, depths) if isinstance(depths, int) else np.asarray(depths, np.float64)
  if depths.size == 0 or depths.min() < 0 or depths.max() > 1:
    raise RulerError(f"needle depths must be fractions in [0, 1], got {depths.tolist()}")
  return [(int(n), float(d)) for n in lengths for d in depths]


def needle_cell(tokenizer, *, length: int, depth: float, seed: int, index: int,
                haystack: Sequence[str] | None = None, format_prompt: FormatPrompt | None = None,
                add_bos: bool | None = None) -> Sample:
  """One grid cell: niah_single_1 (noise) or, given documents, niah_single_2 (essay), needle at `depth`.

  The sample generator does not depend on the depth, so one (length, index) has the same needle and
  haystack at every depth; only the needle's position moves.
  """
  task = "niah_single_1" if haystack is None else "niah_single_2"
  return generate(task, tokenizer, length=length, seed=seed, index=index, haystack=haystack,
                  format_prompt=format_prompt, depth=depth, add_bos=add_bos)
