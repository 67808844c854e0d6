"""Token-level haystacks for long-context probes: exact-length filler, needles at token depths, random values.

Everything here works on token ids, not characters: text pieces (sentences, needles, list entries) are encoded
one at a time and concatenated, and the last filler piece is cut so the result has exactly the requested number
of tokens. A needle goes to the piece boundary nearest its requested depth, where depth is measured in filler
tokens (0 = before the first filler token, 1 = after the last), so it never splits a sentence and lands within
one piece of the depth asked for.

Word lists are built in (no downloads). They are pruned at import so that no word occurs inside another
(RULER scores by substring, so "cat" inside "catch" would count as found); then "adjective-noun" keys cannot
occur inside one another either.
"""

from __future__ import annotations

import itertools
import re
import string
import uuid
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = np.round(np.linspace(0, 100, num=40)).astype(int) / 100  # RULER's needle depth grid, as fractions

_ADJECTIVES = """
able absent acid active actual afraid agile alert alive ample ancient angry anxious arctic awake bald basic bitter
blank bland blind bold brave brief bright brisk broad broken busy calm candid careful cheap cheerful chilly civil
clean clever cloudy coarse cold common cozy crisp cruel curious cute damp daring dark dear deep dense dizzy dry
dull eager early easy elder empty equal exact faint fancy fast fierce final firm flat fond formal fragile free
fresh friendly frozen funny gentle giant glad golden grand great greedy green grim gross happy hard harsh heavy
hidden hollow honest huge humble hungry icy ideal idle jolly keen kind large late lazy lean light little lively
lonely long loud loyal lucky magic major mellow merry mild minor modern modest moist narrow nasty neat nervous
noble noisy odd old open pale plain polite poor proud quick quiet rapid rare ready rich rigid ripe rough round
royal rude rural rusty sad safe salty scarce secret sharp shiny short shy silent silly simple sleepy slim slow
small smart smooth soft solid sour spare steep stiff strange strict strong sunny super sweet swift tall tame
tender thick thin tidy tiny tough tricky ugly upset urban vague vast vivid warm weak wealthy weary wide wild wise
witty young zealous
"""
_NOUNS = """
actor airport album anchor animal apple apron army arrow artist attic author avenue badge bakery balloon banana
band bank barn basket beach beard bell belt bench berry bicycle bird blanket boat bone book boot bottle box
bracelet branch bread brick bridge broom brother bucket building bull butter button cabin cable cake camera camp
candle canoe canyon captain carpet carrot castle cave chair chalk cheese cherry chicken child church circle city
cliff clock cloud coat coffee coin comet cookie corn cottage cotton country cousin crab crane crown cup curtain
cushion daisy desert desk diamond dinner doctor dog doll dolphin donkey door dragon drawer dream dress drum duck
eagle earth egg elbow elephant engine envelope eye fabric face falcon farm feather fence field finger fire fish
flag flower flute forest fork fountain fox frog fruit garden garlic gate ghost gift giraffe glass glove goat
guitar hammer harbor hat hawk heart helmet hill honey horse hospital hotel house island jacket jar jewel jungle
kettle king kitchen kite knee knife ladder lake lamp lantern leaf lemon letter library lion lizard lobster
machine magnet map marble market meadow melon mirror monkey moon mountain mouse museum needle nest newspaper
ocean office onion orange orchard owl oyster painter palace pancake paper parrot peach pear pebble pencil penguin
pepper piano picture pillow pilot pine pirate planet plate pocket poet pond potato puppet puzzle queen rabbit
radio rainbow raven ribbon river road robot rocket roof rose sailor salad sandal saucer school scissors shadow
shark sheep shell ship shirt shoe shovel singer sister skirt sky snail snake soap sock spider spoon square
squirrel stable star station statue stone storm stove street sugar suitcase swan sweater table teacher temple
tent tiger toast tomato tooth tower town tractor train truck trumpet tulip turtle umbrella valley vase village
violin volcano wagon wallet watch water whale wheel window wizard wolf yacht zebra
"""
_VERBS = """
accept admire allow answer arrive bake balance behave blink boil borrow bounce breathe build burn buy calculate
carry chase cheer chew choose clap climb collect compare cook copy count crawl decide deliver describe dig
discover dive drink drive earn enjoy escape examine explain explore fetch fill find fix float fold follow forget
gather gaze giggle grab grow guess hang help hide hike hurry imagine invent invite jog join juggle jump kick knit
knock laugh learn lift listen march measure melt mix move nod notice obey order paint pack pause pick plant play
polish pour pray print promise pull push race read relax remember repair rescue ride roar roll sail scrub search
sew shake shout sing sink skate sleep slide smile sneeze solve spell spin splash stir stretch study swim swing
talk taste teach throw tickle travel trust type visit walk wander wash wave whisper whistle wink wish wonder write
yawn yell
"""


class HaystackError(ValueError):
  """A haystack source that cannot fill a prompt (e.g. documents without text); the message says which."""


def _substring_free(words: Iterable[str]) -> list[str]:
  """The sorted distinct words that occur inside no other word of the set."""
  unique = sorted(set(words))
  joined = "|" + "|".join(unique) + "|"
  return [w for w in unique if joined.count(w) == 1]


_ALL = _substring_free((_ADJECTIVES + _NOUNS + _VERBS).split())
_KEPT = set(_ALL)
ADJECTIVES = tuple(w for w in sorted(set(_ADJECTIVES.split())) if w in _KEPT)
NOUNS = tuple(w for w in sorted(set(_NOUNS.split())) if w in _KEPT)
WORDS = tuple(_ALL)  # common-words extraction draws from these, then from adjective-noun compounds


def compound(i: int) -> str:
  """The i-th "adjective-noun" word, 0 <= i < len(ADJECTIVES) * len(NOUNS) (RULER's key words)."""
  return f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}"


NUM_COMPOUNDS = len(ADJECTIVES) * len(NOUNS)


def random_value(rng: np.random.Generator, kind: str) -> str:
  """One random needle key or value: "numbers" (7 digits), "words" (adjective-noun) or "uuids" (version 4)."""
  if kind == "numbers":
    return str(int(rng.integers(10**6, 10**7)))
  if kind == "words":
    return compound(int(rng.integers(NUM_COMPOUNDS)))
  if kind == "uuids":
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))
  raise HaystackError(f"unknown needle value type {kind!r}; expected numbers, words or uuids")


def distinct_values(rng: np.random.Generator, kind: str, n: int, exclude: Iterable[str] = ()) -> list[str]:
  """n distinct random values of `kind` (see random_value), none of them in `exclude`."""
  taken, out = set(exclude), []
  while len(out) < n:
    value = random_value(rng, kind)
    if value not in taken:
      taken.add(value)
      out.append(value)
  return out


def random_names(rng: np.random.Generator, n: int, letters: int) -> list[str]:
  """n distinct upper-case names of `letters` letters (variable-tracking variables)."""
  names: list[str] = []
  while len(names) < n:
    name = "".join(rng.choice(list(string.ascii_uppercase), letters))
    if name not in names:
      names.append(name)
  return names


def word_list(rng: np.random.Generator, n: int, rep_common: int, rep_other: int, num_common: int, spare: int,
              compounds: bool = False) -> tuple[list[str], list[str], list[str]]:
  """RULER's common-words list: n distinct words, num_common of them listed rep_common times, the rest rep_other.

  Words come from WORDS, or all from adjective-noun compounds (never mixed, so no listed word occurs inside
  another). Returns (the shuffled list, the common words, `spare` further distinct words not in the list).
  """
  if compounds:
    chosen = [compound(int(i)) for i in rng.choice(NUM_COMPOUNDS, n + spare, replace=False)]
  else:
    chosen = [WORDS[i] for i in rng.permutation(len(WORDS))[:n + spare]]
  common = chosen[:num_common]
  listed = common * rep_common + chosen[num_common:n] * rep_other
  return [listed[i] for i in rng.permutation(len(listed))], common, chosen[n:]


def encode(tokenizer, text: str) -> np.ndarray:
  """i32[n] ids of `text` alone (no BOS/EOS)."""
  return np.asarray(tokenizer.encode(text), np.int32).reshape(-1)


def repeat_pieces(tokenizer, text: str) -> Iterator[np.ndarray]:
  """The same piece forever, encoded once (the noise haystack)."""
  return itertools.repeat(encode(tokenizer, text))


def sentence_pieces(tokenizer, documents: Sequence[str], sep: str = " ") -> Iterator[np.ndarray]:
  """Sentences of the documents in order, cycling through them, each encoded with a trailing `sep`.

  Whitespace runs are collapsed to one space (as RULER does with its essays) and a sentence ends after
  . ! or ? (optionally followed by closing quotes or brackets) and whitespace.
  """
  if not any(doc.strip() for doc in documents):
    raise HaystackError("haystack documents contain no text")
  while True:
    for doc in documents:
      for sentence in re.split(r"(?<=[.!?])[\"')\]]*\s+", re.sub(r"\s+", " ", doc).strip()):
        if sentence:
          yield encode(tokenizer, sentence + sep)


def fill(pieces: Iterator[np.ndarray], budget: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates pieces up to exactly `budget` tokens, cutting the last one.

  Returns:
    tokens i32[budget] and bounds i64[k]: the piece boundaries 0 = b_0 < ... < b_{k-1} = budget.
  """
  chunks, bounds, total = [], [0], 0
  while total < budget:
    piece = next(pieces)
    if piece.size == 0:
      continue
    chunks.append(piece[:budget - total])
    total += chunks[-1].size
    bounds.append(total)
  tokens = np.concatenate(chunks) if chunks else np.zeros((0,), np.int32)
  return tokens.astype(np.int32), np.asarray(bounds, np.int64)


def haystack(pieces: Iterator[np.ndarray], needles: Sequence[np.ndarray], depths: Sequence[float],
             budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Exactly `budget` tokens: filler from `pieces` with each needle at the boundary nearest its depth.

  Args:
    needles: token arrays inserted whole; depths: one fraction in [0, 1] per needle, of the filler length
      (budget minus the needle tokens). Needles at the same boundary keep their given order.
  Returns:
    tokens i32[budget]; starts i64[len(needles)], each needle's first token in `tokens`; achieved f64[...], the
    filler tokens before each needle over the filler length.
  """
  filler_len = budget - sum(int(n.size) for n in needles)
  filler, bounds = fill(pieces, filler_len)
  targets = np.asarray(depths, np.float64) * filler_len
  at = bounds[np.abs(bounds[None, :] - targets[:, None]).argmin(axis=1)] if len(needles) else bounds[:0]
  order = np.argsort(at, kind="stable")
  chunks, starts, cursor, inserted = [], np.zeros(len(needles), np.int64), 0, 0
  for j in order:
    chunks.append(filler[cursor:at[j]])
    starts[j] = at[j] + inserted
    chunks.append(needles[j])
    inserted += needles[j].size
    cursor = at[j]
  chunks.append(filler[cursor:])
  tokens = np.concatenate(chunks).astype(np.int32)
  return tokens, starts, at / max(filler_len, 1)


def fit_count(build: Callable[[int], np.ndarray], budget: int, lo: int, hi: int | None = None, probe: int = 64
              ) -> tuple[int, np.ndarray] | None:
  """A count n with len(build(n)) <= budget < len(build(n + 1)) (or n = hi if build(hi) fits), and build(n).

  For contexts sized by a count (list words, documents) whose token length grows about linearly in n: each
  probe interpolates linearly between the closest measured counts below and above the budget (bisecting when
  two probes in a row fail to halve the bracket), so a 128k-token context costs a handful of encodes. The
  answer's n and n + 1 are both measured, so it holds even where the length is not monotone in n. Counts
  above `hi` are never built. Returns None when build(lo) does not fit.
  """
  cache: dict[int, np.ndarray] = {}
  hi = np.iinfo(np.int64).max if hi is None else hi

  def size(n: int) -> int:
    if n not in cache:
      cache[n] = build(n)
    return cache[n].size

  if size(lo) > budget:
    return None
  start, a, b, step = lo, lo, None, 1  # a: largest count known to fit; b: smallest known not to
  x, width, stalls = min(lo + probe, hi), None, 0
  while a < hi and (b is None or b - a > 1):
    if size(x) <= budget:
      a = max(a, x)
    else:
      b = x if b is None else min(b, x)
    if b is None:  # extrapolate from the mean slope so far, at least doubling the step
      slope = (size(a) - size(start)) / max(a - start, 1)
      x = min(hi, a + max(step, int((budget - size(a)) / slope) if slope > 0 else step))
      step *= 2
    elif b - a > 1:
      stalls = stalls + 1 if width is not None and b - a > width / 2 else 0
      if stalls >= 2:  # interpolation stopped halving the bracket: bisect
        x, stalls = (a + b) // 2, 0
      else:
        x = a + int((budget - size(a)) * (b - a) / max(size(b) - size(a), 1))
        x = min(max(x, a + 1), b - 1)
      width = b - a
  return a, cache[a]
