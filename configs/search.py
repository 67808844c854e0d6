"""LongRoPE evolutionary search configs (lrjax.search).

  python experiments/search.py --config=configs/search.py:tiny --workdir=/tmp/search_tiny
  python experiments/search.py --config=configs/search.py:llama2_128k --config.model=/ckpt/Llama-2-7b-hf \
      --config.data.source=<pg19 validation> --workdir=...

Variants (get_config(arg)):
  tiny            built-in byte model (window 256), 8x = 2048 tokens, builtin:valid, a few minutes on a CPU
  tiny_longrope2  tiny + LongRoPE2 critical-dimension search (cd in [d_tcd^10, d_tcd]; [s, 2s] from cd up, NTK
                  below; LongRoPE2's initialisation)
  tiny_needle     tiny + LongRoPE2 needle-driven fitness (perplexity of the answer tokens only)
  tiny_temperature tiny + the attention temperature as a searched gene
  tiny_second     progressive second stage on tiny's result: 2048 -> 4096 (set base_factors)
  tiny_short      short-context recovery at 256/512 with tiny's result as long factors (set base_factors)
  llama2_128k, llama2_256k     paper search on LLaMA2-7B (s = 32, 64)
  llama2_2048k    second stage from the 256k fine-tuned model to 2048k (8x, halved population)
  llama2_short    4k/8k recovery on the 128k fine-tuned model
  mistral_128k, mistral_256k   paper search on Mistral-7B v0.1 (original window 4096, YaRN seed β 128/2)
  smollm2         the real SmolLM2-135M-Instruct (window 8192) to 16k (s = 2) without fine-tuning: fitness on
                  Vim's options.txt reference manual; 12 x 5 generations sized for a 2-core CPU (see below)

Factor bounds are λ ∈ [min_factor_scale·s + min_factor_offset, max_factor_scale·s + max_factor_offset] on a
`step` grid, s = target / original (second stage: target / base_length, relative to the fine-tuned factors).
The paper's Table 4 uses [1, 1.25·s] (the default); the official code uses [1, 1 + s]
(--config.search.max_factor_scale=1 --config.search.max_factor_offset=1).
"""

import ml_collections

from configs import finetune
from lrjax.search import PAPER_N_HAT_CHOICES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "long"                # long | second (progressive, multiplies base_factors) | short (recovery)
  c.model = "builtin"             # "builtin" (lrjax/assets/model) or an HF model directory
  c.dtype = "float32"             # compute dtype of the fitness forward pass
  c.attention = "blockwise"
  c.block_q = 512
  c.block_k = 512
  c.sliding_window = -1           # -1 = the checkpoint's, 0 = off (full causal attention), N = N tokens
  c.resume = False                # continue the search state in --workdir
  c.progress = True               # tqdm bar per generation
  c.base_factors = ""             # second: fine-tuned factors (JSON or CSV); short: the long factors
  c.base_length = 0               # second: fine-tuning length; short: the long target (HF max_position_embeddings)
  c.short_lengths = ()            # short: lengths to search (each its own bucket)
  # Hardware of a paper-scale run, read by --config.dry_run=True (lrjax.dryrun): compiles the fitness program
  # with abstract weights on simulated devices laid out as config.mesh, prints per-device memory and FLOPs, and
  # fails when it exceeds device_memory_gb.
  c.dry_run = False
  c.layout = ml_collections.ConfigDict(dict(
      model=ml_collections.ConfigDict(),  # architecture (ModelConfig fields), e.g. configs.finetune.LLAMA2_7B
      device_memory_gb=0.0))
  # The devices the search runs on (and its dry run compiles for): candidates over data, documents over fsdp,
  # each document's tokens over sequence (ring attention). All ones: one device, no mesh.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin:valid"
  c.data.tokenizer = "byte"       # "auto" = the model's own
  c.data.num_documents = 5        # paper: 5 PG19 validation documents (3 Books3 beyond 512k)
  c.data.sample_documents = True  # drawn at random (seeded by search.seed) from those >= the target, as the paper
  c.data.fitness = "ppl"          # ppl (truncate protocol) | needle (LongRoPE2 App. C answer-token PPL)
  c.data.needle_seed = 0          # needle numbers' seed (fitness=needle only)

  s = c.search = ml_collections.ConfigDict()
  s.target_length = 0
  s.original_length = 0           # 0 = the model's original window (ModelConfig.original_length)
  # Algorithm 1 (paper §4.1): P, N1, N2, top-k parents, p, T.
  s.population = 64
  s.mutations = 16
  s.crossovers = 16
  s.parents = 32
  s.mutation_prob = 0.3
  s.iterations = 40
  s.crossover_tries = 20          # official max_crossover_try
  s.max_tries = 100               # attempts to find a new (never evaluated) mutant
  s.early_stop_patience = 0       # stop after this many generations without improvement > tol (0 = off)
  s.early_stop_tol = 1e-3
  # Search space (Table 4).
  s.step = 0.01
  s.min_factor_scale = 0.0
  s.min_factor_offset = 1.0
  s.max_factor_scale = 1.25
  s.max_factor_offset = 0.0
  s.search_n_hat = True
  s.n_hat = 0                     # fixed n̂ when search_n_hat is False
  s.n_hat_choices = PAPER_N_HAT_CHOICES
  s.temperature = "su"            # su = sqrt(1 + ln s / ln L) | yarn = 0.1 ln s + 1 | a number
  s.temperature_length = 0        # length whose s sets the temperature (0 = the search target)
  s.search_temperature = False    # beyond the paper: temperature as a gene
  s.temperature_range = (1.0, 1.5)
  s.temperature_step = 0.01
  s.seeds = ("pi", "ntk", "yarn")  # yarn: the official seed (linear in λ); yarn_hf: inverse of HF's blend
  s.yarn_beta_fast = 32.0
  s.yarn_beta_slow = 1.0
  s.init_factors = ()             # extra seed factor files
  s.critical_dim = False          # LongRoPE2: search the critical pair cd (NTK below it, [s, 2s] from it up)
  s.critical_dim_range = (0, 0)   # (lo, hi) of cd; (0, 0) = LongRoPE2's [d_tcd^10, d_tcd] (10 periods .. theory)
  s.seed = 0
  # Execution.
  s.candidates_per_call = 1       # C candidates per compiled call (jax.vmap over stacked RopeArrays)
  s.doc_batch = 1                 # documents per call
  return c


def _tiny(c):
  c.model = "builtin"
  c.data.source = "builtin:valid"
  c.data.tokenizer = "byte"
  c.data.num_documents = 4
  s = c.search
  s.target_length = 2048          # 8x the 256-token window
  s.population = 16
  s.mutations = 6
  s.crossovers = 6
  s.parents = 8
  s.iterations = 6
  s.candidates_per_call = 4
  s.doc_batch = 4
  return c


def _paper_llama2(c, target):
  c.model = "/path/to/Llama-2-7b-hf"
  c.dtype = "bfloat16"
  c.attention = "ring"            # each document split over the sequence axis; blockwise attention per step
  c.block_q = c.block_k = 2048
  # 8 x H100 (80 GB): every document's tokens split over the 8 GPUs, weights sharded alike.
  c.layout.model = ml_collections.ConfigDict(finetune.LLAMA2_7B)
  c.mesh.update(data=1, fsdp=1, sequence=8, tensor=1)
  c.layout.device_memory_gb = 80.0
  # 5 PG19 validation books of >= target tokens (TFDS pg19 prepared under data_dir).
  c.data.source = "tfds:pg19?split=validation&field=book_text&data_dir=/path/to/tensorflow_datasets"
  c.data.tokenizer = c.model
  c.data.num_documents = 5
  c.search.target_length = target
  c.search.original_length = 4096
  return c


def _paper_mistral(c, target):
  _paper_llama2(c, target)
  c.model = c.data.tokenizer = "/path/to/Mistral-7B-v0.1"
  # Official code: original = sliding_window = 4096 for Mistral v0.1; YaRN seed with β = (128, 2). The paper
  # disabled sliding-window attention (issue #8): so does this config.
  c.search.original_length = 4096
  c.search.yarn_beta_fast = 128.0
  c.search.yarn_beta_slow = 2.0
  c.sliding_window = 0
  c.layout.model = ml_collections.ConfigDict(finetune.MISTRAL_7B)
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = base_config()
  if arg == "tiny":
    return _tiny(c)
  if arg == "tiny_longrope2":
    _tiny(c)
    c.search.critical_dim = True
    c.search.seeds = ("critical", "pi", "ntk", "yarn")
    c.search.min_factor_scale, c.search.min_factor_offset = 1.0, 0.0   # [s, 2s] above the critical dim
    c.search.max_factor_scale, c.search.max_factor_offset = 2.0, 0.0
    return c
  if arg == "tiny_needle":
    _tiny(c)
    c.data.fitness = "needle"
    c.data.needle_seed = 1
    return c
  if arg == "tiny_temperature":
    _tiny(c)
    c.search.search_temperature = True
    return c
  if arg == "tiny_second":
    _tiny(c)
    c.stage = "second"
    c.base_factors = "REQUIRED: factors.json of a tiny search"
    c.base_length = 2048
    c.search.target_length = 4096
    c.search.original_length = 256
    return c
  if arg == "tiny_short":
    _tiny(c)
    c.stage = "short"
    c.base_factors = "REQUIRED: factors.json of a tiny search"
    c.base_length = 2048
    c.short_lengths = (256, 512)
    c.search.target_length = 0
    c.search.original_length = 256
    c.search.max_factor_scale, c.search.max_factor_offset = 0.0, 4.0
    c.search.temperature_length = 2048     # the long temperature, as transformers applies to both tables
    c.search.search_n_hat, c.search.n_hat_choices = False, PAPER_N_HAT_CHOICES
    c.search.seeds = ("pi", "ntk", "yarn", "base")
    c.data.num_documents = 4
    return c
  if arg == "llama2_128k":
    return _paper_llama2(c, 131072)
  if arg == "llama2_256k":
    return _paper_llama2(c, 262144)
  if arg == "llama2_2048k":
    _paper_llama2(c, 2097152)
    c.stage = "second"
    c.model = c.data.tokenizer = "/path/to/llama2-7b-longrope-256k-finetuned"
    c.base_factors = "/path/to/ft_la2_256k.csv"
    c.base_length = 262144
    c.data.source = "/path/to/books3_validation.jsonl"   # 3 Books3 books of >= 2048k tokens
    c.data.num_documents = 3
    # Beyond 512k the paper halves population, mutation and crossover sizes (32/8/8); ~10-15 iterations fit
    # the budget at 2048k (one evaluation ~50 min on 8 A100s).
    c.search.population, c.search.mutations, c.search.crossovers, c.search.parents = 32, 8, 8, 16
    return c
  if arg == "llama2_short":
    _paper_llama2(c, 0)
    c.stage = "short"
    c.model = c.data.tokenizer = "/path/to/llama2-7b-longrope-128k-finetuned"
    c.base_factors = "/path/to/ft_la2_128k.csv"
    c.base_length = 131072
    c.short_lengths = (4096, 8192)
    # Reduced maximum λ (paper §3.3); the published 4k/8k tables for the 128k model stay below 3.
    c.search.max_factor_scale, c.search.max_factor_offset = 0.0, 8.0
    c.search.temperature_length = 131072   # transformers applies the long attention factor to both tables
    c.search.search_n_hat, c.search.n_hat_choices = False, PAPER_N_HAT_CHOICES
    c.search.seeds = ("pi", "ntk", "yarn", "base")
    return c
  if arg == "smollm2":
    # One 16k-token fitness document costs ~2 min per candidate on 2 CPU cores: 12 + 4 x 6 = 36 evaluations,
    # about 75 minutes. The paper's budget (64 + 40 x 32 = 1344 evaluations on 5 documents) would take ~9 days.
    c.model = "smollm2"
    c.data.source = "/usr/share/vim/vim90/doc/options.txt"
    c.data.tokenizer = "auto"
    c.data.num_documents = 1
    s = c.search
    s.target_length = 16384
    s.population, s.mutations, s.crossovers, s.parents, s.iterations = 12, 3, 3, 6, 4
    return c
  if arg == "mistral_128k":
    return _paper_mistral(c, 131072)
  if arg == "mistral_256k":
    return _paper_mistral(c, 262144)
  raise ValueError(f"unknown search config {arg!r}; see configs/search.py for the variants")
