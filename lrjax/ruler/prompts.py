"""RULER's prompt texts, and how a prompt is wrapped for a model: plain, a RULER-style template, or a chat template.

Templates, answer prefixes and the needle sentence are RULER's (scripts/data/synthetic/constants.py). A prompt is
`format_prompt(task_text, answer_prefix)`: RULER puts the answer prefix after the model template, so for a chat
model it opens the assistant's turn. The package's errors live here, at the bottom of its imports.
"""

from __future__ import annotations

from typing import Callable

FormatPrompt = Callable[[str, str], str]

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DOCUMENT = "Document {i}:\n{document}"
TEMPLATES = {  # family -> (task template, answer prefix), RULER's text
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
            "the dots '....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
           "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
           " Answer:"),
}
CHATML = "<|im_start|>user\n{task_template}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2-Instruct and kin
TEMPLATE_CHOICES = ("auto", "plain", "chat")


class RulerError(ValueError):
  """A RULER request that cannot be built, scored or run; the message names the argument and the problem."""


class LengthError(RulerError):
  """The requested length cannot hold the task's template, needles and generated tokens."""


def plain_prompt(task_text: str, answer_prefix: str) -> str:
  """RULER's "base" model template: the task text followed by the answer prefix."""
  return task_text + answer_prefix


def model_template(template: str) -> FormatPrompt:
  """A format_prompt from a RULER-style model template with one {task_template} field (e.g. CHATML)."""
  if template.count("{task_template}") != 1:
    raise RulerError(f"model template {template!r} must contain {{task_template}} exactly once")
  return lambda task_text, answer_prefix: template.replace("{task_template}", task_text) + answer_prefix


def chat_prompt(tokenizer) -> FormatPrompt:
  """The tokenizer's chat template around the task text as one user turn, then the answer prefix.

  The rendered text is the whole prompt (a template that starts with BOS writes it), so it is encoded without
  adding BOS, as transformers' apply_chat_template(tokenize=True) does.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise RulerError(f"template 'chat': tokenizer {tokenizer!r} has no chat template; use 'plain'")

  def format_prompt(task_text: str, answer_prefix: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": task_text}]) + answer_prefix
  return format_prompt


def prompt_format(choice: str, tokenizer) -> tuple[str, FormatPrompt, bool | None]:
  """(resolved choice, format_prompt, add_bos) for a template choice: plain, chat, or auto (chat exactly when the
  tokenizer has a chat template, as RULER uses the model's template for instruct models).

  add_bos is None for plain prompts (the tokenizer's own rule) and False for chat prompts (see chat_prompt).
  """
  if choice not in TEMPLATE_CHOICES:
    raise RulerError(f"template {choice!r}: expected one of {', '.join(TEMPLATE_CHOICES)}")
  if choice == "auto":
    choice = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
  if choice == "chat":
    return choice, chat_prompt(tokenizer), False
  return choice, plain_prompt, None
