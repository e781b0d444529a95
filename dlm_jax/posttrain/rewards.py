"""Verifiable rewards for RL (rl.reward): plain Python callables `reward(completion: str, answer: str) -> float`.

`completion` is the decoded reply (cut at the end of turn / EOS); `answer` is the example's "answer" field. A name
here, or "module:function" for any importable callable of that form.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from dlm_jax import sandbox
from dlm_jax.errors import DLMError

_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str:
  """The final answer of a reply: inside the last <answer>...</answer> (d1's format), else the last \\boxed{...}
  (MATH), else the whole reply."""
  for pattern in (_TAGGED, _BOXED):
    found = pattern.findall(text)
    if found:
      return found[-1]
  return text


def normalize(text: str) -> str:
  """Whitespace collapsed, case folded, a trailing period dropped; a lone number in canonical form ('1,000.0' ->
  '1000')."""
  s = " ".join(text.strip().split()).lower().rstrip(".")
  if _NUMBER.fullmatch(s):
    value = float(s.replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)
  return s


def exact_match(completion: str, answer: str) -> float:
  """1.0 when the reply's final answer equals the reference after `normalize`, else 0.0."""
  return float(normalize(extract_answer(completion)) == normalize(answer))


_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)


def code_tests(completion: str, answer: str, timeout: float = 5.0) -> float:
  """1.0 when the reply's program (the first ```python block, else the whole reply) followed by the tests in
  `answer` (asserts) exits cleanly in the sandbox (`dlm_jax.sandbox`: a fresh isolated interpreter with time, memory
  and file limits, in an empty directory), else 0.0."""
  fenced = _FENCE.search(completion)
  program = fenced.group(1) if fenced else completion
  return float(sandbox.passes_tests(program, answer, timeout=timeout))


REWARDS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "code_tests": code_tests}


def resolve(spec: str) -> Callable[[str, str], float]:
  """rl.reward -> the callable."""
  if spec in REWARDS:
    return REWARDS[spec]
  if ":" not in spec:
    raise DLMError(f"rl.reward={spec!r} is not a reward here ({', '.join(REWARDS)}) nor 'module:function'")
  module, _, name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise DLMError(f"rl.reward={spec!r} cannot be imported ({e}); give an importable module:function") from None
  if not callable(fn):
    raise DLMError(f"rl.reward={spec!r} is not callable; name a function reward(completion, answer) -> float")
  return fn
