"""RULER (Hsieh et al. 2024) for lrjax: its synthetic long-context tasks at exact token lengths, RULER's scoring,
and the experiment that runs them on a model (settings x lengths x tasks, and needle-in-a-haystack grids).

  prompts   RULER's texts; plain, RULER-style and chat-template prompts; the package's errors
  tasks     the 13 tasks' registry and exact-length sample generation (`generate`, `needle_cell`)
  scoring   RULER's metrics, and the mean / standard error of a cell and of the average over tasks
  sources   essay haystacks from lrjax.data sources; QA records from SQuAD / HotpotQA / lrjax files
  results   per-sample records (resume), tables, CSVs, results.json and heat maps
  run       the experiment (configs/ruler.py, experiments/ruler.py)
"""

from lrjax.ruler.prompts import (CHATML, DOCUMENT, NEEDLE, TEMPLATE_CHOICES, TEMPLATES, FormatPrompt, LengthError,
                                 RulerError, chat_prompt, model_template, plain_prompt, prompt_format)
from lrjax.ruler.tasks import (TASKS, Sample, TaskConfig, generate, needle_cell, needle_grid, needs_documents,
                               sample_rng, select, takes_depth, task_config)
from lrjax.ruler.scoring import METRICS, average, mean_stderr, postprocess, score, string_match_all, string_match_part
from lrjax.ruler.run import SCHEMA, Cell, plan, run, validate_config

