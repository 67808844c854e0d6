"""Perplexity-vs-length evaluation configs (lrjax.evaluate.run).

  python experiments/evaluate.py --config=configs/evaluate.py --workdir=/tmp/eval
  python experiments/evaluate.py --config=configs/evaluate.py:proofpile --config.model=/ckpt/Llama-2-7b-hf \
      --config.data="('/data/proofpile_test.jsonl',)" --workdir=/tmp/eval_llama2

Variants (get_config(arg)):
  (default)   built-in byte model (window 256) on builtin:test at 256..2048 tokens, truncate protocol
  proofpile   paper Proof-pile protocol: 10 documents >= 128k tokens, truncated, lengths 4k..128k (set data)
  pg19        paper PG19 protocol: the whole TFDS pg19 test split (100 books; a book shorter than a length is
              one shorter window), sliding window, stride 256 at 8k (set lengths for 64k/128k)
  smollm2     SmolLM2-135M-Instruct (window 8192) at 4k/8k/16k on three held-out Vim reference manuals
              (syntax.txt, eval.txt, pi_netrw.txt; never seen by the search, which used options.txt):
              none, PI, NTK, YaRN, dynamic NTK and the factors of configs/search.py:smollm2
  smollm2_32k the same texts at 32k for the two best settings
  books3      paper Books3 protocol: 20 random books >= 2048k tokens (seeded), windows every 256k tokens at
              8k..2048k: below 256k they are disjoint samples, each fully scored (the official loop's behaviour)

Settings (rows of the table; each is "SPEC" or "LABEL=SPEC"):
  none                plain RoPE          model     the checkpoint's own rope scaling
  pi | linear, ntk, yarn, llama3          s = max(1, length / original_length), per column
  METHOD:S            a fixed factor s (e.g. yarn:16)
  dynamic             HF dynamic NTK with factor 1: s follows each window's length (dynamic:F sets factor F)
  PATH                a factor file (lrjax JSON or LongRoPE CSV), e.g. a search's factors.json; a bare CSV
                      has no target length: PATH?target_length=131072 (s = target / L sets the temperature)
  PATH?temperature_from=length   the paper's evaluation code: the temperature follows each evaluated length
                      (1.0 within the original window) instead of the target

L is the model's original window (the checkpoint's original_max_position_embeddings, Mistral's sliding window,
else max_position_embeddings), or original_length when set; it is printed with every table.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "builtin"            # "builtin" (lrjax/assets/model) or a checkpoint directory (HF, Meta, native)
  c.tokenizer = "auto"           # auto: the model directory's tokenizer.json / tokenizer.model (byte for builtin);
  #                                or "byte" / a tokenizer file / a directory
  c.dtype = "float32"            # compute dtype
  c.attention = "blockwise"      # blockwise | reference | xla | cudnn | ring (with a mesh sequence axis)
  c.block_q = 512
  c.block_k = 512
  c.sliding_window = -1           # -1 = the checkpoint's, 0 = off (full causal attention), N = N tokens
  c.data = ("builtin:test",)     # sources: builtin:SPLIT, FILE.jsonl[.gz][?field=], FILE.txt, DIR[?pattern=],
  #                                tfds:NAME?split=test&data_dir=DIR&field=text
  c.num_documents = 0            # documents per source (0 = all that pass min_tokens)
  c.sample_documents = False     # draw num_documents at random (seeded) from those that pass, instead of the first
  c.document_seed = 0
  c.min_tokens = -1              # keep documents with >= this many tokens; -1 = the largest length (the same
  #                                documents at every length, as in the paper)
  c.short_documents = "error"    # error | skip | keep (as one shorter window): documents shorter than a length
  c.lengths = (256, 512, 1024, 2048)
  c.settings = ("none", "pi", "ntk", "yarn", "dynamic")
  c.original_length = 0          # L, the original window (0 = the model's: see above)
  c.protocol = "truncate"        # truncate (one window per document) | sliding (with stride)
  c.stride = 0                   # sliding-window stride in tokens (sliding only; 0 with truncate)
  c.batch_size = 1               # windows per device call
  c.max_length = 1 << 21         # refuse longer lengths (guard against a typo'd 10x evaluation)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))  # used with > 1 device
  c.save_windows = True          # per-window NLL in results.json
  c.progress = True              # tqdm bar

  if variant == "proofpile":
    c.num_documents = 10
    c.lengths = (4096, 8192, 32768, 65536, 98304, 131072)
    c.settings = ("none", "yarn", "model")
    c.min_tokens = 131072
  elif variant == "pg19":
    c.data = ("tfds:pg19?split=test&field=book_text",)  # needs the dataset prepared (ArrayRecord) in TFDS' data_dir
    c.protocol = "sliding"
    c.stride = 256
    c.lengths = (8192,)
    c.settings = ("none", "yarn", "model")
    c.min_tokens = 0
    c.short_documents = "keep"
  elif variant == "books3":
    # paper Books3 protocol: 20 random books longer than 2048k tokens, windows every 256k tokens
    c.data = ("/path/to/books3_validation.jsonl",)
    c.num_documents = 20
    c.sample_documents = True
    c.min_tokens = 2097152
    c.protocol = "sliding"
    c.stride = 262144
    c.lengths = (8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152)
    c.settings = ("none", "yarn", "model")
    c.attention = "ring"            # with --config.mesh.sequence=N on N devices beyond one device's memory
  elif variant in ("smollm2", "smollm2_32k"):
    vim = "/usr/share/vim/vim90/doc"
    c.model = "smollm2"
    c.data = (f"{vim}/syntax.txt,{vim}/eval.txt,{vim}/pi_netrw.txt",)
    longrope = "longrope=experiments/results/smollm2/search_16k/factors.json"
    c.lengths = (4096, 8192, 16384)
    c.settings = ("none", "pi", "ntk", "yarn", "dynamic", longrope)
    if variant == "smollm2_32k":
      c.lengths = (32768,)
      c.settings = ("yarn", longrope)
  elif variant:
    raise ValueError(f"unknown evaluate config variant {variant!r}; expected proofpile, pg19, books3, smollm2 or "
                     "smollm2_32k")
  return c
