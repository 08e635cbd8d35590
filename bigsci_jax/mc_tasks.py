"""Built-in multiple-choice tasks that run offline, made from the handbook's held-out
(test) chapters — or, for prompt tuning, its train chapters (split="train") — and
harness-style scoring.

  next_sentence/<lang>  a paragraph's first sentence as context; its true next
                        sentence against 3 sentences from other pages of the
                        same language.
  translation/<lang>    the handbook is one book in many languages: paragraphs of
                        a page are aligned across locales (pages whose paragraph
                        counts differ are dropped); k-shot, pick the translation of
                        an English paragraph among 4 paragraphs of that language.
  cloze/<lang>          LAMBADA-style: a paragraph without its last word, which
                        the model must predict (languages that separate words
                        with spaces).
  word_choice/<lang>    the cloze items as multiple choice: the last word among
                        itself and 3 other words of the paragraph (Children's
                        Book Test style).

They exist so the whole evaluation loop can be run and tested without the
internet; real benchmarks come through the lm-evaluation-harness. Scoring follows
the harness. Multiple choice: `acc` by summed log-likelihood of each choice
(request: context, delimiter + choice), `acc_norm` by log-likelihood per UTF-8
byte of the choice (the harness's `acc_bytes`). Cloze: `ppl` = exp(-mean
log-likelihood of the word), `acc` = the word is the greedy continuation, and
`exact_match` = greedy generation's first word is the word. Every accuracy has
its standard error.

Pure Python over the corpus; the model enters through a likelihood.Scorer (or, for
multiple choice, any function from requests to log-likelihoods).
"""

import dataclasses
import math
import os
import re

import numpy as np

from bigsci_jax import corpus

_SENTENCE_END = re.compile(r"(?<=[.!?;؟])\s+|(?<=[。！？])")
CHOICES = 4


@dataclasses.dataclass(frozen=True)
class Item:
  context: str
  choices: tuple       # the choices' texts; each request continues the context with
  answer: int          # delimiter + choice
  delimiter: str = " "


@dataclasses.dataclass(frozen=True)
class ClozeItem:
  context: str         # a paragraph up to its last word (no trailing space)
  word: str            # the word to predict, after a space


NO_SPACES = ("ja", "zh_cn", "zh_tw")  # scripts without spaces between words: no cloze task
_LAST_WORD = re.compile(r"\s(\w+)[.!?;:,…)»\"']*\s*$")


def sentences(paragraph, min_chars=12):
  return [s.strip() for s in _SENTENCE_END.split(paragraph) if len(s.strip()) >= min_chars]


def _locale(root, lang):
  for locale in corpus.locales(root):
    if corpus.lang_code(locale, corpus.locales(root)) == lang:
      return locale
  raise corpus.CorpusError(f"unknown language {lang!r}: the handbook has "
                           f"{', '.join(corpus.lang_code(l, corpus.locales(root)) for l in corpus.locales(root))}.")


def _pages(root, split):
  chapters = corpus.split_chapters(root)[split]
  return [(chapter, page) for chapter, pages in corpus.chapters(root, corpus.ENGLISH)
          if chapter in chapters for page in pages]


def _choices(rng, answer, pool):
  """The answer and CHOICES - 1 distinct distractors from pool, shuffled."""
  others = [p for p in pool if p != answer]
  picked = [others[i] for i in rng.choice(len(others), CHOICES - 1, replace=False)]
  order = rng.permutation(CHOICES)
  options = [answer] + picked
  return tuple(options[i] for i in order), int(np.argmin(order))


def _paragraphs(lang, root, split):
  """(page index, paragraph) over `lang`'s pages in the split's chapters, untranslated
  paragraphs (identical to English) left out."""
  root = corpus.handbook_root(root)
  locale = _locale(root, lang)
  english = corpus.english_paragraphs(root) if locale != corpus.ENGLISH else frozenset()
  chapters = corpus.split_chapters(root)[split]
  for page, doc in enumerate(corpus.documents(root, locale, english, chapter_filter=chapters)):
    for paragraph in doc["text"].split("\n"):
      yield page, paragraph


def next_sentence_items(lang, *, root=None, limit=200, seed=0, split="test"):
  pairs, page_of = [], {}
  for page, paragraph in _paragraphs(lang, root, split):
    parts = sentences(paragraph)
    for s in parts[1:]:
      page_of.setdefault(s, page)
    if len(parts) >= 2:
      pairs.append((page, parts[0], parts[1]))
  rng = np.random.default_rng(seed)
  items = []
  for i in rng.permutation(len(pairs))[:limit]:
    page, first, true = pairs[i]
    pool = [s for s, p in page_of.items() if p != page]
    choices, answer = _choices(rng, true, pool)
    items.append(Item(first, choices, answer))
  return items


def aligned_paragraphs(lang, root=None, min_chars=40, max_chars=300, split="test"):
  """[(English paragraph, its translation)] over the split's chapters' pages whose
  paragraphs line up one to one with the English ones (same count, same order)."""
  root = corpus.handbook_root(root)
  locale = _locale(root, lang)
  pairs = []
  for _, page in _pages(root, split):
    en_path, xx_path = (os.path.join(root, l, page) for l in (corpus.ENGLISH, locale))
    if not (os.path.isfile(en_path) and os.path.isfile(xx_path)):
      continue
    en = corpus.paragraphs(en_path)
    xx = corpus.paragraphs(xx_path)
    if len(en) == len(xx):  # untranslated paragraphs (identical to English) are skipped
      pairs += [(a, b) for a, b in zip(en, xx)
                if a != b and min_chars <= min(len(a), len(b)) and max(len(a), len(b)) <= max_chars]
  return pairs


def translation_items(lang, *, shots=2, root=None, limit=200, seed=0, split="test"):
  pairs = aligned_paragraphs(lang, root, split=split)
  if len(pairs) < CHOICES + shots:
    raise corpus.CorpusError(f"only {len(pairs)} aligned paragraphs for {lang!r}: too few for "
                             f"{CHOICES}-way translation items with {shots} shots.")
  rng = np.random.default_rng(seed)
  items = []
  for i in rng.permutation(len(pairs))[:limit]:
    source, target = pairs[i]
    shot_ids = [j for j in rng.permutation(len(pairs)) if j != i][:shots]
    prompt = "".join(f"English: {pairs[j][0]}\nTranslation: {pairs[j][1]}\n\n" for j in shot_ids)
    choices, answer = _choices(rng, target, [t for _, t in pairs])
    items.append(Item(f"{prompt}English: {source}\nTranslation:", choices, answer))
  return items


def cloze_items(lang, *, root=None, limit=200, seed=0, min_chars=60, split="test"):
  """Paragraphs of `lang` (the split's chapters) whose last word (before closing
  punctuation) is made of letters; the context is the paragraph before that word."""
  if lang in NO_SPACES:
    raise corpus.CorpusError(f"no cloze task for {lang!r}: its script does not separate words "
                             f"with spaces; use next_sentence/{lang}.")
  items = []
  for _, paragraph in _paragraphs(lang, root, split):
    match = _LAST_WORD.search(paragraph)
    if (len(paragraph) >= min_chars and match and match.group(1).isalpha()
        and len(match.group(1)) >= 2):
      items.append(ClozeItem(paragraph[:match.start(1)].rstrip(), match.group(1)))
  rng = np.random.default_rng(seed)
  return [items[i] for i in rng.permutation(len(items))[:limit]]


_WORD = re.compile(r"\w+")


def word_choice_items(lang, *, root=None, limit=200, seed=0, split="test"):
  """The cloze items as multiple choice, in the manner of the Children's Book Test (Hill
  et al. 2016): the paragraph's last word among itself and 3 other words of the same
  paragraph (letters only, 2 characters or more)."""
  rng = np.random.default_rng(seed)
  items = []
  for item in cloze_items(lang, root=root, limit=None, seed=seed, split=split):
    pool = sorted({w for w in _WORD.findall(item.context)
                   if w.isalpha() and len(w) >= 2 and w != item.word})
    if len(pool) >= CHOICES - 1:
      choices, answer = _choices(rng, item.word, pool)
      items.append(Item(item.context, choices, answer))
  return items[:limit]


def _stderr(mean, n):
  """Standard error of a mean of n 0/1 outcomes (sample variance, as the harness)."""
  return math.sqrt(mean * (1 - mean) / max(n - 1, 1))


def score(items, loglik_fn, outcomes=False):
  """Harness-style multiple-choice metrics (items may have different numbers of
  choices). loglik_fn([(context, continuation)]) returns the summed log-likelihood of
  each continuation given its context. outcomes=True adds each item's 0/1 outcome per
  accuracy ({'acc': bool [N], ...}, under 'outcomes'), for paired_gain."""
  requests = [(item.context, item.delimiter + choice) for item in items
              for choice in item.choices]
  logliks = np.asarray(loglik_fn(requests), float)
  ends = np.cumsum([len(item.choices) for item in items])
  hits = {"acc": [], "acc_norm": []}
  for item, values in zip(items, np.split(logliks, ends[:-1])):
    sizes = np.array([len(c.encode()) for c in item.choices], float)
    hits["acc"].append(values.argmax() == item.answer)
    hits["acc_norm"].append((values / sizes).argmax() == item.answer)
  result = {"items": len(items),
            "chance": float(np.mean([1.0 / len(item.choices) for item in items]))}
  for name, values in hits.items():
    mean = float(np.mean(values))
    result[name], result[f"{name}_stderr"] = mean, _stderr(mean, len(items))
  if outcomes:
    result["outcomes"] = {name: np.asarray(values, bool) for name, values in hits.items()}
  return result


def paired_gain(before, after):
  """How much `after` beats `before` on the same items, from their per-item 0/1 outcomes
  (score(..., outcomes=True)['outcomes']): {metric: mean of after - before,
  metric_stderr: its standard error}. Paired over the items, so what makes an item easy
  or hard for both cancels: the error is that of the per-item differences (sample
  variance), smaller than the two scores' own errors whenever they agree on most items
  (Miller 2024, "Adding Error Bars to Evals")."""
  gain = {}
  for name in sorted(before.keys() & after.keys()):
    if len(before[name]) != len(after[name]):
      raise ValueError(f"{name}: {len(before[name])} outcomes before and {len(after[name])} "
                       f"after; a paired gain needs the same items in both.")
    diff = np.asarray(after[name], float) - np.asarray(before[name], float)
    gain[name] = float(diff.mean())
    gain[f"{name}_stderr"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
  return gain


_FIRST_WORD = re.compile(r"\s*(\w+)")


def first_word(text):
  """The first run of word characters in a generation (the harness filter
  `regex` with pattern ^\\s*(\\w+)), or ''."""
  match = _FIRST_WORD.match(text)
  return match.group(1) if match else ""


def score_cloze(items, scorer, max_new_tokens=8, outcomes=False):
  """Cloze metrics of a likelihood.Scorer: ppl, acc (greedy) and exact_match
  (generation), with standard errors (outcomes=True: and each item's, as score)."""
  logliks, greedy = scorer.loglikelihood([(item.context, " " + item.word) for item in items])
  generations = scorer.generate_until([item.context for item in items], ("\n",), max_new_tokens)
  matches = np.array([first_word(g) == item.word for g, item in zip(generations, items)])
  n = len(items)
  result = {"items": n, "ppl": math.exp(-float(np.mean(logliks)))}
  for name, hits in (("acc", greedy), ("exact_match", matches)):
    mean = float(np.mean(hits))
    result[name], result[f"{name}_stderr"] = mean, _stderr(mean, n)
  if outcomes:
    result["outcomes"] = {"acc": np.asarray(greedy, bool), "exact_match": matches}
  return result
