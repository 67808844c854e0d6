"""RULER configs (lrjax.ruler.run): settings x lengths x tasks, and needle-in-a-haystack grids.

  python experiments/ruler.py --config=configs/ruler.py --workdir=/tmp/ruler
  python experiments/ruler.py --config=configs/ruler.py:smollm2 --workdir=experiments/results/ruler_smollm2
  python experiments/ruler.py --config=configs/ruler.py:smollm2_grid --workdir=experiments/results/ruler_smollm2/grid

A rerun with the same workdir resumes: finished samples are read back from samples.jsonl, never recomputed.

Sweeps: each is a product lengths x settings x tasks (x depths) with `samples` prompts per cell; a cell in
several sweeps runs the largest count. Settings follow configs/evaluate.py (none, yarn, pi, ntk, dynamic, a factor
file, LABEL=SPEC); derived methods use s = length / L, so within the original window they equal none, and cells
whose RoPE arrays are equal share their answers (they are computed once). Tasks are RULER's names: niah_single_1..3,
niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_1 (needs squad), qa_2 (needs hotpotqa).
depths = () draws RULER's random needle depths; fractions in [0, 1] make a needle grid (single-needle tasks).

Variants:
  (default)   built-in byte model (window 256) at 2048 tokens (8x its window), one task per family, none and
              YaRN, 1 sample, at most 16 generated tokens: the CI run (seconds). A code model this small scores
              ~0; the run shows the pipeline, not retrieval.
  tiny_grid   the built-in model, niah_single_1 at 1024 / 2048 tokens x 3 depths: the grid pipeline in CI.
  smollm2     SmolLM2-135M-Instruct (window 8192, its chat template, essays = the Vim user manual): the 11
              synthetic tasks at 4k and 8k for none (and yarn, which equals none there: no extra compute), 3
              samples each; niah_single_1 and niah_multikey_1 at 16k for none, YaRN and the searched LongRoPE
              factors, 3 samples each; LongRoPE inside the window with 1 sample per cell (its factors rescale
              every length, so its cells cost as much as the whole 4k/8k sweep again). Budget on 2 CPU cores (prefill ~25 s at 4k, ~60 s at 8k,
              ~150 s at 16k, plus decoding up to EOS): 66 prompts at 4k/8k ~ 1 h, 18 at 16k ~ 45 min: the run
              committed in experiments/results/ruler_smollm2. With 3 samples a cell's standard error is large
              (up to ~33 points); the task average over 11 tasks is tighter. QA needs SQuAD / HotpotQA files: set squad / hotpotqa and add qa_1 / qa_2.
  smollm2_16k  the 16k slice of smollm2 with 2 samples per cell (none, YaRN, LongRoPE x niah_single_1,
              niah_multikey_1: 12 prompts, ~40 min on 2 CPU cores).
  smollm2_grid  SmolLM2, niah_single_2 (a needle in the Vim manual) at 2k/4k/8k/16k x 5 depths, 2 samples per cell,
              for none and LongRoPE at every length and YaRN at 16k (~2 h).
"""

import ml_collections

LONGROPE = "longrope=experiments/results/smollm2/search_16k/factors.json"
SYNTHETIC = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
VIM_MANUAL = "/usr/share/vim/vim90/doc?pattern=usr_*.txt"  # English prose on any machine with vim's docs
GRID_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sweep(lengths, settings, tasks, samples, depths=()) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(lengths=tuple(lengths), settings=tuple(settings), tasks=tuple(tasks),
                                        samples=samples, depths=tuple(depths)))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "builtin"              # "builtin", "smollm2", or a checkpoint
  c.tokenizer = "auto"             # auto: the model's own (bytes for builtin)
  c.dtype = "float32"
  c.attention = "blockwise"
  c.block_q = 512
  c.block_k = 512
  c.sliding_window = -1            # -1 = the checkpoint's, 0 = off, N = N tokens
  c.original_length = 0            # 0 = the model's original window
  c.sweeps = [sweep([2048], ["none", "yarn"], ["niah_single_1", "niah_multikey_1", "vt", "cwe", "fwe"], 1)]
  c.seed = 42                      # RULER's default
  c.template = "auto"              # auto (chat when the tokenizer has a chat template) | plain | chat
  c.haystack = "builtin:test"      # essay haystack: any lrjax.data source ('' when no task has essays)
  c.squad = ""                     # qa_1: SQuAD-style JSON/JSONL (official dev-v2.0.json or lrjax records)
  c.hotpotqa = ""                  # qa_2: HotpotQA-style JSON/JSONL (official distractor dev set or lrjax records)
  c.max_new_tokens = 16            # at most this many generated tokens per task (0 = RULER's tokens_to_generate)
  c.batch_size = 1                 # prompts per model call (a kill loses at most one batch)
  c.policy = "total_length"        # total_length | reprefill (lrjax.decode)
  c.progress = True
  if variant == "tiny_grid":
    c.sweeps = [sweep([1024, 2048], ["none"], ["niah_single_1"], 1, depths=(0.0, 0.5, 1.0))]
    c.haystack = ""
  elif variant == "smollm2":
    c.model = "smollm2"
    c.haystack = VIM_MANUAL
    c.max_new_tokens = 0
    c.sweeps = [sweep([4096, 8192], ["none", "yarn"], SYNTHETIC, 3),
                sweep([16384], ["none", "yarn", LONGROPE], ["niah_single_1", "niah_multikey_1"], 3),
                sweep([4096, 8192], [LONGROPE], SYNTHETIC, 1)]
  elif variant == "smollm2_16k":
    c.model = "smollm2"
    c.haystack = VIM_MANUAL
    c.max_new_tokens = 0
    c.sweeps = [sweep([16384], ["none", "yarn", LONGROPE], ["niah_single_1", "niah_multikey_1"], 2)]
  elif variant == "smollm2_grid":
    c.model = "smollm2"
    c.haystack = VIM_MANUAL
    c.max_new_tokens = 0
    c.sweeps = [sweep([2048, 4096, 8192, 16384], ["none", LONGROPE], ["niah_single_2"], 2, depths=GRID_DEPTHS),
                sweep([16384], ["yarn"], ["niah_single_2"], 2, depths=GRID_DEPTHS)]
  elif variant:
    raise ValueError(f"unknown ruler config variant {variant!r}; expected '', tiny_grid, smollm2 or smollm2_grid")
  return c
