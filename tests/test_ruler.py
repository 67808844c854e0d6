"""RULER tasks and the needle grid: exact lengths, answers recovered by parsing the prompt text, RULER's scores."""

import collections
import re

import numpy as np
import pytest

from lrjax import haystack, ruler, tokenizers

BYTES = tokenizers.ByteTokenizer()
ESSAYS = [" ".join([f"Essay {d} opens here."] + [
    f"Sentence {i} of essay {d} is about the {['river', 'market', 'mountain'][i % 3]} and its history{'!?.'[i % 3]}"
    for i in range(60)]) for d in range(3)]
RECORDS = [  # SQuAD style (one context) and HotpotQA style (several paragraphs)
    {"question": "Who wrote the play Hamlet?", "answers": ["William Shakespeare", "Shakespeare"],
     "context": "Hamlet is a tragedy written by William Shakespeare sometime between 1599 and 1601."},
    {"question": "What is the capital of France?", "answers": ["Paris"],
     "context": "Paris is the capital and most populous city of France, on the river Seine."},
    {"question": "Which river flows through Cairo?", "answers": ["the Nile", "Nile"],
     "paragraphs": ["Cairo\nCairo is the capital of Egypt.", "Nile\nThe Nile flows north through Cairo."]},
    {"question": "How many legs does a spider have?", "answers": ["eight", "8"],
     "context": "Spiders are arachnids with eight legs and chelicerae with fangs."},
]
CORPUS = ["the quick brown fox jumps over the lazy dog", "a journey of a thousand miles begins with a single step",
          "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
          "One of the special magic numbers for a key is: 1234567.", "VAR ABCDE = VAR FGHIJ 12345"] * 4
LENGTHS = {"niah": (1024, 3000), "vt": (2048, 5000), "cwe": (2048, 8192), "fwe": (1024, 4096), "qa": (1024, 4096)}


@pytest.fixture(scope="module")
def bpe():
  """A small byte-level BPE tokenizers file with BOS <s> = 1 (as tests/test_tokenizers.py builds one)."""
  tk = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tk.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tok


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenizer(request, tmp_path_factory):
  if request.param == "byte":
    return BYTES
  path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  request.getfixturevalue("bpe").save(str(path))
  tok = tokenizers.load_tokenizer(str(path))
  assert tok.bos_id == 1
  return tok


def _generate(task, tok, length, seed=0, index=0, **kw):
  kw = dict(dict(haystack=ESSAYS, qa_records=RECORDS), **kw)
  return ruler.generate(task, tok, length=length, seed=seed, index=index, **kw)


def _text(sample, tok):
  ids = sample.tokens[1:] if tok.bos_id is not None else sample.tokens  # decode without the BOS id
  return tok.decode(ids)


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_exact_length_and_determinism(task, tokenizer):
  config = ruler.TASKS[task]
  for length in LENGTHS[config.family]:
    a = _generate(task, tokenizer, length, seed=3, index=5)
    assert a.tokens.dtype == np.int32 and a.tokens.shape == (length - config.max_new_tokens,)
    assert (a.task, a.length, a.max_new_tokens, a.metric) == (task, length, config.max_new_tokens, config.metric)
    if tokenizer.bos_id is not None:
      assert a.tokens[0] == tokenizer.bos_id and (a.tokens[1:] != tokenizer.bos_id).all()
    # Other tasks and samples generated in between change nothing: each sample has its own generator.
    _generate("niah_single_1", tokenizer, 1024, seed=3, index=4)
    b = _generate(task, tokenizer, length, seed=3, index=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.outputs == b.outputs
    for other in (_generate(task, tokenizer, length, seed=3, index=6), _generate(task, tokenizer, length, seed=4,
                                                                                    index=5)):
      assert other.tokens.shape == a.tokens.shape and not np.array_equal(other.tokens, a.tokens)


def _needles(text):
  """{key: [values]} of every needle sentence in the text."""
  found = collections.defaultdict(list)
  for key, value in re.findall(r"One of the special magic (?:numbers|words|uuids) for (\S+) is: ([^\s.]+)\.", text):
    found[key].append(value)
  return found


def _queried_keys(text):
  question = re.findall(r"What (?:is|are all) the special magic \w+ for (.+?) mentioned in the provided text\?", text)
  assert len(question) == 1
  return re.split(r", and |, ", question[0])


@pytest.mark.parametrize("task", [t for t, c in ruler.TASKS.items() if c.family == "niah"])
def test_niah_answers_come_from_the_prompt(task, tokenizer):
  params = ruler.TASKS[task].params
  for index in range(3):
    sample = _generate(task, tokenizer, 3000, index=index)
    text = _text(sample, tokenizer)
    needles, queried = _needles(text), _queried_keys(text)
    assert len(queried) == params["num_needle_q"]
    assert sorted(sample.outputs) == sorted(v for key in queried for v in needles[key])
    for key in queried:  # every value of a queried key is there, and no distractor shares the key
      assert len(needles[key]) == params["num_needle_v"]
    keys_in_text = len(needles)
    if params["type_haystack"] == "needle":  # the haystack is other keys' needles
      assert keys_in_text > 20 and all(len(vs) == 1 for vs in needles.values())
    else:
      assert keys_in_text == max(params["num_needle_k"], params["num_needle_q"])
    value_re = {"numbers": r"\d{7}", "words": r"[a-z]+-[a-z]+",
                "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}
    assert all(re.fullmatch(value_re[params["type_needle_v"]], v) for v in sample.outputs)
    assert all(re.fullmatch(value_re[params["type_needle_k"]], k) for k in needles)
    single = params["num_needle_q"] * params["num_needle_v"] == 1
    noun = params["type_needle_v"][:-1] if single else params["type_needle_v"]
    opening = f"A special magic {noun} is hidden" if single else f"Some special magic {noun} are hidden"
    assert text.startswith(opening)
    query = ", ".join(queried[:-1]) + ", and " + queried[-1] if len(queried) > 1 else queried[0]
    assert text.endswith(f" The special magic {noun} for {query} mentioned in the provided text "
                         f"{'is' if single else 'are'}")
    if params["type_haystack"] == "essay":
      assert "Sentence 3 of essay 0 is about the river" in text
    elif params["type_haystack"] == "noise":
      assert haystack.NOISE + "\n" + haystack.NOISE in text


@pytest.mark.parametrize("docs", [None, ESSAYS])
def test_needle_depth_in_tokens(docs):
  """Byte tokens are bytes, so the needle's offset in the haystack is read off the decoded text."""
  piece = max(len(s) + 1 for s in re.split(r"(?<=[.!?])\s+", " ".join(ESSAYS))) if docs else len(haystack.NOISE) + 1
  length, needles = 4096, set()
  for depth in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
    sample = ruler.needle_cell(BYTES, length=length, depth=depth, seed=1, index=2, haystack=docs)
    text = _text(sample, BYTES)
    start = text.index("I will quiz you about the number afterwards.\n") + len("I will quiz you about the number "
                                                                             "afterwards.\n")
    end = text.rindex("\nWhat is the special magic number for")
    (key, (value,)), = _needles(text).items()
    needle = f"One of the special magic numbers for {key} is: {value}." + (" " if docs else "\n")
    offset = text.index(needle) - start
    filler = end - start - len(needle)
    assert abs(offset - depth * filler) <= piece / 2 + 1
    assert abs(sample.depth - offset / filler) < 1e-9
    assert sample.outputs == [value]
    needles.add(needle)
  assert len(needles) == 1  # one (length, index): the same needle and haystack at every depth
  assert ruler.needle_grid([1024, 2048], 3) == [(1024, 0.0), (1024, 0.5), (1024, 1.0), (2048, 0.0), (2048, 0.5),
                                                (2048, 1.0)]
  assert ruler.needle_grid([512], [0.25]) == [(512, 0.25)]


def _resolve(lines):
  """{variable: value} from `VAR X = 123` / `VAR X = VAR Y` lines, following chains."""
  assign = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", lines))
  value = lambda v: assign[v] if assign[v].isdigit() else value(assign[v][4:])
  return {v: value(v) for v in assign}


def test_vt_chain_is_in_the_prompt(tokenizer):
  for length in LENGTHS["vt"]:
    for index in range(2):
      sample = _generate("vt", tokenizer, length, index=index)
      text = _text(sample, tokenizer)
      example, task = text.split("\nMemorize and track the chain(s)")
      query = re.findall(r"assigned the value (\d+) in the text above", task)[0]
      resolved = _resolve(task.split("Question:")[0])
      assert sorted(sample.outputs) == sorted(v for v, x in resolved.items() if x == query)
      assert len(sample.outputs) == 5 and all(len(v) == 5 for v in sample.outputs)
      assert task.endswith(f"5 variables are assigned the value {query}, they are: ")
      # The in-context example is answered correctly, with 3-letter names.
      example_query = re.findall(r"assigned the value (\d+) in the text above", example)[0]
      example_resolved = _resolve(example.split("Question:")[0])
      answer = example.split("they are: ")[1].split()
      assert sorted(answer) == sorted(v for v, x in example_resolved.items() if x == example_query)
      assert len(answer) == 5 and all(len(v) == 3 for v in answer)


def _counts(listing):
  entries = re.findall(r"(\d+)\. (\S+)", listing)
  assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))  # numbered 1, 2, 3, ...
  return collections.Counter(w for _, w in entries)


def test_cwe_answers_are_the_most_common_words(tokenizer):
  for length, (common, other) in zip(LENGTHS["cwe"], [(6, 1), (30, 3)]):  # RULER's short (< 4096) / long settings
    sample = _generate("cwe", tokenizer, length, index=1)
    text = _text(sample, tokenizer)
    parts = text.split("Memorize the ones that appear most often.\n")
    assert len(parts) == 3  # the few-shot example, then the task
    listing = parts[2].split("\nQuestion:")[0]
    counts = _counts(listing)  # a last entry cut mid-word counts once (no listed word begins another)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(sample.outputs) and len(set(sample.outputs)) == 10
    assert min(counts[w] for w in top) == common and max(c for w, c in counts.items() if w not in top) <= other
    shot_list, shot_answer = parts[1].split("\nQuestion:")[0], parts[1].split("appear most often in the list are: ")[1]
    assert sorted(w for w, _ in _counts(shot_list).most_common(10)) == sorted(re.findall(r"\d+\. (\S+)", shot_answer))


def test_fwe_answers_are_the_most_frequent_coded_words(tokenizer):
  for length in LENGTHS["fwe"]:
    sample = _generate("fwe", tokenizer, length, index=2)
    text = _text(sample, tokenizer)
    coded = text.split("Find the three most frequently appeared coded words. ")[1].split("\nQuestion:")[0].split()
    words = [w for w in coded if set(w) != {"."}]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in words)
    counts = collections.Counter(words).most_common()
    assert sorted(w for w, _ in counts[:3]) == sorted(sample.outputs)
    assert counts[2][1] > counts[3][1]
    # Zipf with alpha = 2: the k-th word appears about 1/k^2 as often as the dots (rank 1), 1/4 for rank 2.
    dots = sum(set(w) == {"."} for w in coded)
    assert 0.15 < counts[0][1] / dots < 0.35


def _documents(text):
  """The "Document i:\n..." chunks between the instructions and the question (paragraphs hold no blank line)."""
  body = text.split("The following are given documents.\n\n")[1].split("\n\nAnswer the question based")[0]
  return body.rstrip("\n").split("\n\n")  # the padding may end in part of a "\n\n" separator


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_gold_paragraphs_among_distractors(task, tokenizer):
  paragraphs = lambda r: r.get("paragraphs", [r.get("context")])
  for length in LENGTHS["qa"]:
    for index in (0, 2):
      sample = _generate(task, tokenizer, length, index=index)
      record = RECORDS[index]
      text = _text(sample, tokenizer)
      chunks = _documents(text)
      full = [re.fullmatch(r"Document (\d+):\n(.*)", c, re.DOTALL) for c in chunks]
      assert all(full[:-1]) and [int(m.group(1)) for m in full[:-1]] == list(range(1, len(chunks)))
      docs = [m.group(2) for m in full[:-1]]
      others = [p for r in RECORDS if r is not record for p in paragraphs(r)]
      # Only the last document may be cut: it is then the start of a distractor.
      if full[-1] and full[-1].group(1) == str(len(chunks)) and full[-1].group(2) in paragraphs(record) + others:
        docs.append(full[-1].group(2))
      else:
        assert any(f"Document {len(chunks)}:\n{o}".startswith(chunks[-1]) for o in others)
      for gold in paragraphs(record):
        assert docs.count(gold) == 1  # whole, once
      assert all(d in others for d in docs if d not in paragraphs(record))
      assert len(docs) > 2 * len(paragraphs(record))
      assert text.endswith(f"Question: {record['question']} Answer:")
      assert sample.outputs == record["answers"] and sample.metric == "string_match_part"


def test_chat_template_hook():
  fmt = ruler.model_template(ruler.CHATML)
  endings = {"niah_single_1": r" The special magic number for \S+ mentioned in the provided text is",
             "cwe": r" Answer: The top 10 words that appear most often in the list are:",
             "vt": r" Answer: According to the chain\(s\) of variable .* they are: "}
  for task, ending in endings.items():
    length = LENGTHS[ruler.TASKS[task].family][0]
    sample = _generate(task, BYTES, length, format_prompt=fmt)
    text = _text(sample, BYTES)
    assert sample.tokens.size == length - sample.max_new_tokens
    assert text.startswith("<|im_start|>user\n")
    assert re.search(r"<\|im_end\|>\n<\|im_start\|>assistant\n" + ending + r"\Z", text)
    # RULER wraps each common-words example in the model template too.
    assert text.count("<|im_start|>user\n") == (2 if task == "cwe" else 1)


CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # SmolLM2's, shortened


def test_chat_template_prompts(bpe):
  """template=auto picks the tokenizer's chat template when it has one; the rendered chat is the whole prompt."""
  plain = tokenizers.HFTokenizer(bpe, name="bpe", bos_id=1, add_bos=True)
  chat = tokenizers.HFTokenizer(bpe, name="bpe+chat", bos_id=1, add_bos=True, chat_template=CHAT_TEMPLATE)
  assert ruler.prompt_format("auto", plain)[0] == "plain" and ruler.prompt_format("auto", BYTES)[0] == "plain"
  choice, fmt, add_bos = ruler.prompt_format("auto", chat)
  assert (choice, add_bos) == ("chat", False)
  sample = ruler.generate("niah_single_1", chat, length=1024, seed=0, index=0, format_prompt=fmt, add_bos=add_bos)
  assert sample.tokens.size == 1024 - 128 and 1 not in sample.tokens.tolist()  # no BOS id added to the chat
  text = chat.decode(sample.tokens)
  assert text.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
                         "A special magic number is hidden within the following text.")
  assert re.search(r"mentioned in the provided text\?<\|im_end\|>\n<\|im_start\|>assistant\n The special magic "
                   r"number for \S+ mentioned in the provided text is\Z", text)
  with_bos = ruler.generate("niah_single_1", plain, length=1024, seed=0, index=0)
  assert with_bos.tokens[0] == 1  # plain prompts keep the tokenizer's rule
  with pytest.raises(ruler.RulerError, match="has no chat template"):
    ruler.prompt_format("chat", BYTES)


def _ruler_string_match_all(preds, refs):  # RULER's definition (scripts/eval/synthetic/constants.py)
  return sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs)) / len(preds) * 100


def test_scoring_matches_ruler_definitions():
  refs = ["1234567", "7654321", "1111111"]
  assert ruler.score("string_match_all", "The numbers are 1234567 and 7654321.", refs) == pytest.approx(200 / 3)
  assert ruler.score("string_match_all", "none here", refs) == 0.0
  assert ruler.score("string_match_all", "BOLD-Apple!", ["bold-apple"]) == 100.0  # case-insensitive
  assert ruler.score("string_match_part", " William Shakespeare wrote it", ["Shakespeare", "Marlowe"]) == 100.0
  assert ruler.score("string_match_part", "Marlow", ["Shakespeare", "Marlowe"]) == 0.0
  assert ruler.postprocess("  x\x00y\tz \n") == "x\ny\nz"
  assert ruler.postprocess("\x01 answer \x02") == "answer"  # control characters become newlines, then strip
  sample = _generate("niah_multivalue", BYTES, 2048)
  half = " ".join(sample.outputs[:2])
  assert ruler.score(sample, half) == 50.0 and ruler.score(sample, " ".join(sample.outputs)) == 100.0
  preds, samples = [half, "nothing", " ".join(sample.outputs).upper()], [sample] * 3
  mean = np.mean([ruler.score(s, p) for s, p in zip(samples, preds)])
  assert mean == pytest.approx(_ruler_string_match_all(preds, [s.outputs for s in samples]))
  qa = _generate("qa_1", BYTES, 1024, index=0)
  assert ruler.score(qa, "It was Shakespeare.") == 100.0


def test_registry_has_rulers_thirteen_tasks():
  assert list(ruler.TASKS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                               "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt",
                               "cwe", "fwe", "qa_1", "qa_2"]
  tokens = {t.name: t.max_new_tokens for t in ruler.TASKS.values()}  # RULER's tokens_to_generate
  assert tokens["niah_multiquery"] == 128 and tokens["vt"] == 30 and tokens["cwe"] == 120
  assert tokens["fwe"] == 50 and tokens["qa_2"] == 32
  assert ruler.TASKS["niah_multikey_3"].params == dict(type_haystack="needle", type_needle_k="uuids",
                                                       type_needle_v="uuids", num_needle_k=1, num_needle_v=1,
                                                       num_needle_q=1)
  assert ruler.TASKS["cwe"].params == dict(freq_cw=30, freq_ucw=3, num_cw=10)
  assert [t.name for t in ruler.select("vt, cwe")] == ["vt", "cwe"]
  assert len(ruler.select("all")) == 13 and {t.group for t in ruler.select("all")} == {
      "retrieval", "multi_hop", "aggregation", "qa"}


def test_word_lists_and_fit_count():
  words = haystack.WORDS
  assert len(words) > 500 and not any(a != b and a in b for a in words for b in words)
  assert len({haystack.compound(i) for i in range(haystack.NUM_COMPOUNDS)}) == haystack.NUM_COMPOUNDS
  size = lambda n: 3 * n + 2 + 10 * (n % 7 == 0)  # not monotone in n
  for budget in (5, 100, 1000, 12345):
    n, tokens = haystack.fit_count(lambda n: np.zeros(size(n), np.int32), budget, 1)
    assert size(n) == tokens.size <= budget < size(n + 1)
  assert haystack.fit_count(lambda n: np.zeros(n, np.int32), 100, 1, hi=10)[0] == 10
  assert haystack.fit_count(lambda n: np.zeros(n + 50, np.int32), 10, 1) is None
  pieces = iter([np.arange(3), np.arange(10, 15), np.arange(20, 24)])
  tokens, starts, achieved = haystack.haystack(pieces, [np.array([-1, -1]), np.array([-2])], [1.0, 0.3], 13)
  assert tokens.tolist() == [0, 1, 2, -2, 10, 11, 12, 13, 14, 20, 21, -1, -1]
  assert starts.tolist() == [11, 3] and achieved.tolist() == [1.0, 0.3]


@pytest.mark.parametrize("call, error, message", [
    (lambda: _generate("niah_single_9", BYTES, 1024), ruler.RulerError, "unknown RULER task"),
    (lambda: _generate("niah_single_1", BYTES, 300), ruler.LengthError, "niah_single_1: length 300 is too short"),
    (lambda: _generate("vt", BYTES, 900), ruler.LengthError, "vt: length 900 is too short"),
    (lambda: _generate("cwe", BYTES, 4096), ruler.LengthError, "cwe: length 4096 is too short"),
    (lambda: _generate("fwe", BYTES, 250), ruler.LengthError, "fwe: length 250 is too short"),
    (lambda: _generate("qa_1", BYTES, 200), ruler.LengthError, "qa_1: length 200 is too short"),
    (lambda: ruler.generate("qa_2", BYTES, length=2048, seed=0, index=0), ruler.RulerError, "needs qa_records"),
    (lambda: ruler.generate("qa_1", BYTES, length=2048, seed=0, index=0, qa_records=[{"question": "q",
                                                                                  "answers": ["a"]}]),
     ruler.RulerError, r"qa_records\[0\]: needs a 'context'"),
    (lambda: _generate("qa_1", BYTES, 2048, qa_records=RECORDS[:1]), ruler.RulerError, "no paragraph outside"),
    (lambda: ruler.generate("niah_single_2", BYTES, length=2048, seed=0, index=0), ruler.RulerError,
     "essay haystack"),
    (lambda: _generate("niah_multikey_1", BYTES, 2048, depth=0.5), ruler.RulerError, "has 4 needles"),
    (lambda: _generate("niah_single_1", BYTES, 2048, depth=1.5), ruler.RulerError, "fraction in"),
    (lambda: _generate("niah_single_1", BYTES, 2048, seed=-1), ruler.RulerError, "seed must be an integer"),
    (lambda: _generate("vt", BYTES, 2048, format_prompt=lambda t, a: "no task"), ruler.RulerError,
     "format_prompt must return its task_text"),
    (lambda: ruler.model_template("no field"), ruler.RulerError, "task_template"),
    (lambda: ruler.score("exact", "x", ["x"]), ruler.RulerError, "unknown metric"),
    (lambda: ruler.needle_grid([1024], [0.5, 2.0]), ruler.RulerError, "fractions in"),
    (lambda: ruler.generate(ruler.task_config("mine", "niah", type_haystack="noise"), BYTES, length=2048,
                            seed=0, index=0), ruler.RulerError, "params do not fit"),
])
def test_bad_inputs(call, error, message):
  with pytest.raises(error, match=message) as info:
    call()
  assert issubclass(info.type, ValueError) and "\n" not in str(info.value)
