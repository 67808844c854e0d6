"""The whole LongRoPE method end to end on one model: what experiments/demo.py and reproduce.py run.

Steps (each writes into its own folder of the work directory and is skipped when its outputs exist, so an
interrupted run resumes where it stopped):

  search_8x_dims   search λ at the target (8x) without n̂ (dimension factors only)     } paper Table 1/11:
  search_8x        search λ and n̂ at the target                                       } the n̂ ablation
  eval_base        perplexity of the base model, 1x..8x: none / PI / NTK / YaRN / both searches
  passkey_base     passkey accuracy of the base model with the searched factors
  finetune         fine-tune at 8x with the searched factors (paper §3.3 progressive extension)
  search_second    search again on the fine-tuned model for a further extension (64x), no fine-tuning
  recovery         short-context recovery: re-search short factors at the original window on the extended model
  eval_extended    perplexity of the fine-tuned model 1x..64x with its factor sets
  passkey_extended passkey accuracy of the extended model
  summary.md / results.json   headline tables, the paper's expected orderings checked, wall times

A config (configs/reproduce_tiny.py, configs/demo.py) lists which steps run, and carries one sub-config per
library entry point: `search`, `second` and `recovery` (configs/search.py: the 8x search, the progressive
second stage, short-context recovery), `finetune` (configs/finetune.py), `evaluate` (configs/evaluate.py), and
the passkey settings. Lengths, factor files and models are filled in by the pipeline.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import jax
import ml_collections

from lrjax import evaluate as evaluate_lib
from lrjax import factors as factors_lib
from lrjax import passkey as passkey_lib
from lrjax import report
from lrjax import rope as rope_lib
from lrjax import schema
from lrjax import search as search_lib
from lrjax import tokenizers as tokenizers_lib
from lrjax import train as train_lib
from lrjax import weights as weights_lib

STEPS = ("search_8x_dims", "search_8x", "eval_base", "passkey_base", "finetune", "search_second", "recovery",
         "eval_extended", "passkey_extended")
# Each sub-config is checked by the experiment it configures (search, train, evaluate, passkey) when it runs.
_SUB = schema.Key(ml_collections.ConfigDict)
SCHEMA = {"model": schema.STR, "steps": schema.SEQUENCE, "target_length": schema.POSITIVE_INT,
          "second_length": schema.POSITIVE_INT, "search": _SUB, "second": _SUB, "recovery": _SUB, "finetune": _SUB,
          "evaluate": _SUB, "passkey": _SUB}


class PipelineError(ValueError):
  """A pipeline config that cannot run; the message names the problem."""


def validate(config: ml_collections.ConfigDict) -> None:
  schema.check(config, SCHEMA, error=PipelineError)
  bad = [s for s in config.steps if s not in STEPS]
  if bad:
    raise PipelineError(f"unknown step(s) {bad}; expected some of {', '.join(STEPS)}")
  needs = {"eval_base": ("search_8x",), "finetune": ("search_8x",), "search_second": ("finetune",),
           "recovery": ("search_second",), "eval_extended": ("search_second",),
           "passkey_extended": ("search_second",)}
  for step in config.steps:
    missing = [n for n in needs.get(step, ()) if n not in config.steps]
    if missing:
      raise PipelineError(f"step {step} needs step(s) {missing} in config.steps")
  if config.second_length <= config.target_length and "search_second" in config.steps:
    raise PipelineError(f"second_length {config.second_length} must exceed target_length "
                        f"{config.target_length}")


def _load(path: str):
  config, params = weights_lib.load(weights_lib.model_path(path))
  return config, jax.device_put(params)


class _Run:
  """Shared state of one pipeline run: models, documents, the log of steps."""

  def __init__(self, config, workdir: str, print_fn: Callable[[str], None]):
    self.config, self.workdir, self.print = config, workdir, print_fn
    self.tokenizer = tokenizers_lib.load_tokenizer(config.search.data.tokenizer)
    self.base = _load(config.model)
    self.window = self.base[0].max_position_embeddings
    t = config.target_length
    self.base_lengths = sorted({n for n in (self.window, 2 * self.window, 4 * self.window, 8 * self.window, t)
                                if n <= t})
    self._extended = None
    self.times = {}
    self.results = {}
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      self.results, self.times = saved.get("results", {}), saved.get("seconds", {})

  def extended(self):
    """The fine-tuned model (loaded once, from the finetune step's export)."""
    if self._extended is None:
      self._extended = _load(self.results["finetune"]["model"])
    return self._extended

  def dir(self, name):
    return os.path.join(self.workdir, name)

  def done(self, name) -> bool:
    return name in self.results

  def record(self, name, value, seconds):
    self.results[name] = value
    self.times[name] = round(seconds, 1)
    report.write_json(os.path.join(self.workdir, "results.json"),
                      {"results": self.results, "seconds": self.times,
                       "config": json.loads(self.config.to_json_best_effort())})


def _search_config(sub: ml_collections.ConfigDict, **search_overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(sub.to_dict())
  c.resume = True  # a rerun continues an interrupted search in the same folder
  for k, v in search_overrides.items():
    c.search[k] = v
  return c


def _search(run: _Run, name: str, sub, model, *, target: int, stage: str = "long", base_path: str = "",
            base_length: int = 0, n_hat: bool = True):
  c = _search_config(sub, target_length=target, search_n_hat=n_hat and sub.search.search_n_hat)
  c.stage, c.base_factors, c.base_length = stage, base_path, base_length
  base = search_lib.load_base(c, model[0])  # the whole first-stage setting: factors and n̂
  docs, info = search_lib.fitness_documents(c, run.tokenizer, target)
  start = time.time()
  result = search_lib.run(c, model[0], model[1], docs, run.dir(name), base=base, target_length=target,
                          stage=stage, tokenizer=run.tokenizer, document_info=info)
  seeds = {k: float(v) for k, v in result.seed_fitness.items()}
  run.record(name, {"factors": os.path.join(run.dir(name), "factors.json"), "fitness": float(result.fitness),
                    "seed_fitness": seeds, "n_hat": int(result.scaling.n_hat),
                    "evaluations": int(result.evolution.evaluations), "compilations": int(result.compilations)},
             time.time() - start)
  run.print(f"{name}: best fitness (ppl on {len(docs)} fitness documents at {target}) {result.fitness:.4g}; "
            f"seeds {', '.join(f'{k} {v:.4g}' for k, v in seeds.items())}; n̂ = {result.scaling.n_hat}")


def _evaluate(run: _Run, name: str, model, settings: list[str], lengths: list[int]):
  c = ml_collections.ConfigDict(run.config.evaluate.to_dict())
  c.settings = tuple(settings)
  c.lengths = tuple(lengths)
  c.original_length = run.window
  start = time.time()
  out = evaluate_lib.run(c, run.dir(name), model=model, print_fn=run.print)
  table = {row: {str(n): v for n, v in cells.items()} for row, cells in out["table"].items()}
  run.record(name, {"table": table, "plot": out["files"]["plot"]}, time.time() - start)


def _passkey(run: _Run, name: str, model, settings: dict[str, Callable[[int], rope_lib.RopeScaling | None]]):
  p = run.config.passkey
  start = time.time()
  rows = {}
  for label, scaling_for_length in settings.items():
    out = passkey_lib.accuracy(model[0], model[1], run.tokenizer, lengths=list(p.lengths),
                               scaling_for_length=scaling_for_length, samples=int(p.samples), seed=int(p.seed),
                               fmt=p.format, max_new_tokens=int(p.max_new_tokens))
    rows[label] = {str(r["length"]): r["accuracy"] for r in out}
    run.print(f"{name} {label}: " + ", ".join(f"{r['length']}: {r['accuracy']:.0%}" for r in out))
  os.makedirs(run.dir(name), exist_ok=True)
  lengths = list(p.lengths)
  report.write_text(os.path.join(run.dir(name), "table.txt"), report.format_table(
      list(rows), lengths, lambda r, n: rows[r][str(n)], row_header="setting \\ length") + "\n")
  report.line_plot(os.path.join(run.dir(name), "passkey.png"),
                   {label: (lengths, [rows[label][str(n)] for n in lengths]) for label in rows},
                   xlabel="prompt length (tokens)", ylabel="passkey accuracy", title=f"passkey ({name})",
                   logx=True)
  run.record(name, {"accuracy": rows}, time.time() - start)


def _factors(path: str, model_config) -> rope_lib.RopeScaling:
  return factors_lib.resolve_file(path, original_length=model_config.original_length,
                                  n_layers=model_config.num_layers, rotary_dim=model_config.rotary_dim)


def _finetune(run: _Run):
  c = ml_collections.ConfigDict(run.config.finetune.to_dict())
  c.init = weights_lib.model_path(run.config.model)
  for stage in c.stages:
    stage.rope = run.results["search_8x"]["factors"]
    stage.length = run.config.target_length
  c.export_hf = run.dir("finetune/model")
  start = time.time()
  out = train_lib.train(c, run.dir("finetune"), report=run.print, progress=True)
  if out["preempted"]:
    raise PipelineError("fine-tuning was interrupted; run again to resume it")
  run.record("finetune", {"model": c.export_hf, "steps": int(out["step"]), "final_loss": out["loss"]},
             time.time() - start)


def _eval_base(run: _Run) -> None:
  settings = ["none", "pi", "ntk", "yarn"]
  if "search_8x_dims" in run.results:
    settings.append(f"longrope (λ only)={run.results['search_8x_dims']['factors']}")
  settings.append(f"longrope (λ + n̂)={run.results['search_8x']['factors']}")
  _evaluate(run, "eval_base", run.base, settings, run.base_lengths)


def _passkey_base(run: _Run) -> None:
  searched = _factors(run.results["search_8x"]["factors"], run.base[0]) if "search_8x" in run.results else None
  settings = {"none": lambda n: None}
  if searched is not None:
    settings["longrope 8x"] = lambda n: searched
  _passkey(run, "passkey_base", run.base, settings)


def _recovery(run: _Run) -> None:
  c = _search_config(run.config.recovery, target_length=0)
  c.stage, c.base_length, c.base_factors = "short", run.config.second_length, run.results["search_second"]["factors"]
  docs, info = search_lib.fitness_documents(c, run.tokenizer, max(c.short_lengths))
  model_config, params = run.extended()
  start = time.time()
  out = search_lib.run_short(c, model_config, params, docs, run.dir("recovery"),
                             base=search_lib.load_base(c, model_config), tokenizer=run.tokenizer, document_info=info)
  run.record("recovery", {"factors": os.path.join(run.dir("recovery"), "factors.json"),
                          "fitness": {str(n): float(r.fitness) for n, r in out.items() if n != "scaling"}},
             time.time() - start)


def _eval_extended(run: _Run) -> None:
  t, t2 = run.config.target_length, run.config.second_length
  lengths = sorted(set(run.base_lengths + [n for n in (2 * t, 4 * t, t2) if n <= t2]))
  settings = [f"ft + 8x factors={run.results['search_8x']['factors']}",
              f"ft + second-stage factors={run.results['search_second']['factors']}"]
  if "recovery" in run.results:
    settings.append(f"ft + second-stage + recovery={run.results['recovery']['factors']}")
  _evaluate(run, "eval_extended", run.extended(), settings, lengths)


def _passkey_extended(run: _Run) -> None:
  model = run.extended()
  second = _factors(run.results["search_second"]["factors"], model[0])
  settings = {"ft + second-stage factors": lambda n: second}
  if "recovery" in run.results:
    rec = _factors(run.results["recovery"]["factors"], model[0])
    settings["ft + second-stage + recovery"] = lambda n: rec
  _passkey(run, "passkey_extended", model, settings)


# Each step, in STEPS order; a step reads what earlier steps recorded in run.results.
_STEP_FUNCTIONS = {
    "search_8x_dims": lambda run: _search(run, "search_8x_dims", run.config.search, run.base,
                                          target=run.config.target_length, n_hat=False),
    "search_8x": lambda run: _search(run, "search_8x", run.config.search, run.base, target=run.config.target_length),
    "eval_base": _eval_base,
    "passkey_base": _passkey_base,
    "finetune": lambda run: _finetune(run),
    "search_second": lambda run: _search(run, "search_second", run.config.second, run.extended(),
                                         target=run.config.second_length, stage="second",
                                         base_path=run.results["search_8x"]["factors"],
                                         base_length=run.config.target_length),
    "recovery": _recovery,
    "eval_extended": _eval_extended,
    "passkey_extended": _passkey_extended,
}


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, *,
                 print_fn: Callable[[str], None] = print) -> dict:
  """Runs config.steps in STEPS order, skipping those recorded as done; returns {"results": ..., "seconds": ...,
  "summary": markdown}."""
  validate(config)
  if not workdir:
    raise PipelineError("--workdir is required")
  os.makedirs(workdir, exist_ok=True)
  run = _Run(config, workdir, print_fn)
  start = time.time()
  for step in STEPS:
    if step not in config.steps:
      continue
    if run.done(step):
      print_fn(f"{step}: done already (in {run.dir(step)})")
      continue
    print_fn(f"== {step}")
    _STEP_FUNCTIONS[step](run)
  summary = summarize(run.results, run.times, window=run.window, target=config.target_length,
                      second=config.second_length)
  report.write_text(os.path.join(workdir, "summary.md"), summary)
  print_fn(summary)
  print_fn(f"pipeline finished in {time.time() - start:.0f} s (this invocation); outputs in {workdir}")
  return {"results": run.results, "seconds": run.times, "summary": summary}


def _fmt(x):
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def _md_table(table: dict, columns: list[str], header: str = "setting") -> str:
  lines = [f"| {header} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for row, cells in table.items():
    lines.append(f"| {row} | " + " | ".join(_fmt(cells.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def summarize(results: dict, seconds: dict, *, window: int, target: int, second: int) -> str:
  """Markdown tables of every finished step, and the paper's expected shape checked on them."""
  out = ["# LongRoPE pipeline results", ""]
  checks = []
  if "eval_base" in results:
    table = results["eval_base"]["table"]
    cols = sorted({c for r in table.values() for c in r}, key=int)
    out += [f"## Base model, no fine-tuning (perplexity; window {window})", "", _md_table(table, cols), ""]
    at = lambda row: table.get(row, {}).get(str(target))
    searched = at("longrope (λ + n̂)")
    dims = at("longrope (λ only)")
    if None not in (searched, at("yarn"), at("ntk"), at("pi")):
      checks.append((f"at {target} without fine-tuning: searched < YaRN < NTK, PI "
                     f"({_fmt(searched)} / {_fmt(at('yarn'))} / {_fmt(at('ntk'))}, {_fmt(at('pi'))})",
                     searched < at("yarn") < min(at("ntk"), at("pi"))))
    if dims is not None and searched is not None:
      n_hat = results.get("search_8x", {}).get("n_hat")
      why = (" (the search kept n̂ = 0, so the gap is search variance, not n̂)" if n_hat == 0 else
             f" (searched n̂ = {n_hat})")
      checks.append((f"n̂ ablation at {target}: λ + n̂ {_fmt(searched)} vs λ only {_fmt(dims)}{why}",
                     searched <= dims))
  for name, title in (("passkey_base", "Passkey, base model"), ("passkey_extended", "Passkey, extended model")):
    if name in results:
      acc = results[name]["accuracy"]
      cols = sorted({c for r in acc.values() for c in r}, key=int)
      out += [f"## {title} (accuracy)", "", _md_table(acc, cols), ""]
  if "eval_extended" in results:
    table = results["eval_extended"]["table"]
    cols = sorted({c for r in table.values() for c in r}, key=int)
    out += [f"## Fine-tuned at {target}, second search to {second} (perplexity)", "", _md_table(table, cols), ""]
    row = table.get("ft + second-stage factors", {})
    if row.get(str(second)) is not None and row.get(str(target)) is not None:
      ratio = row[str(second)] / row[str(target)]
      checks.append((f"after fine-tuning and the second search, ppl at {second} stays close to {target} "
                     f"({_fmt(row[str(second)])} vs {_fmt(row[str(target)])}, ratio {ratio:.2f}; <= 1.10 "
                     "counts as close)", ratio <= 1.10))
    rec = table.get("ft + second-stage + recovery", {}).get(str(window))
    base = results.get("eval_base", {}).get("table", {}).get("none", {}).get(str(window))
    if rec is not None and base is not None:
      checks.append((f"recovery at the original window: {_fmt(rec)} vs base model {_fmt(base)} "
                     f"({100 * (rec / base - 1):+.1f}%; within 1%)", rec <= base * 1.01))
  searches = [(k, v) for k, v in results.items() if k.startswith("search") or k == "recovery"]
  if searches:
    out += ["## Searches", ""]
    for k, v in searches:
      fit = v["fitness"] if isinstance(v["fitness"], dict) else {"": v["fitness"]}
      out.append(f"- {k}: best fitness {', '.join(f'{n} {_fmt(x)}'.strip() for n, x in fit.items())}"
                 + (f"; seeds {', '.join(f'{s} {_fmt(x)}' for s, x in v['seed_fitness'].items())}"
                    if "seed_fitness" in v else "")
                 + (f"; n̂ = {v['n_hat']}; {v['evaluations']} evaluations, {v['compilations']} compilation(s)"
                    if "evaluations" in v else "") + f" ({v['factors']})")
    out.append("")
  if "finetune" in results:
    f = results["finetune"]
    out += [f"Fine-tuning: {f['steps']} steps at {target} tokens, final loss {f['final_loss']:.4f} nats/token.", ""]
  if checks:
    out += ["## The paper's expected shape", ""]
    out += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    out.append("")
  out += ["## Wall time (seconds)", "", " | ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
  return "\n".join(out)
