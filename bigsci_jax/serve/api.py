"""The HTTP side of the server: OpenAI's legacy completions API, the model list, a
health check and vLLM-shaped tokenizer endpoints, over a serve.engine.Engine.

Requests are checked field by field before anything reaches the engine; a bad one
gets a 400 whose body is OpenAI's error object, with a message naming the field.
Conventions (also in the response's `metadata`):
  - every sequence starts from <pad> (id 0, the BOS); a token-id prompt that starts
    with 0 is taken to carry it already;
  - with `echo`, the prompt's tokens come first in `logprobs` and the first of them
    has a null log-probability; for a prefix LM they are scored causally (scored
    inside the bidirectional prefix a token would see itself), while generated
    tokens follow the prompt as the bidirectional prefix;
  - log-probabilities are the model's own (temperature 1, before top-k / top-p);
  - a stop string ends a choice and is not part of its text; the tokens listed are
    those that begin before it; EOS ends a choice and is not listed.
"""

import asyncio
import json
import os
import time
import uuid

from bigsci_jax import generate
from bigsci_jax.serve.engine import EngineBusy, EngineStopped
from bigsci_jax.serve.rows import Choice, Job

MAX_N = 16
MAX_STOP = 16
# OpenAI fields this server does not implement: accepted only with their neutral values
NEUTRAL = {"suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0),
           "frequency_penalty": (None, 0)}
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "echo", "logprobs", "stream", "user", "best_of") + tuple(NEUTRAL)


class RequestError(ValueError):
  """A request the server refuses; becomes an OpenAI-style error body."""

  def __init__(self, message, param=None, status=400, kind="invalid_request_error"):
    super().__init__(message)
    self.param, self.status, self.kind = param, status, kind

  def body(self):
    return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                      "code": None}}


def _int(body, name, default, low, high=None):
  value = body.get(name, default)
  if value is None:
    value = default
  if value is None:
    return None
  if type(value) is not int:  # bool is not a count
    raise RequestError(f"'{name}' must be an integer, not {json.dumps(value)}.", name)
  if value < low or (high is not None and value > high):
    bound = f"between {low} and {high}" if high is not None else f"at least {low}"
    raise RequestError(f"'{name}' must be {bound}; got {value}.", name)
  return value


def _number(body, name, default, low, high, open_low=False):
  value = body.get(name, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RequestError(f"'{name}' must be a number, not {json.dumps(value)}.", name)
  if not (low < value if open_low else low <= value) or value > high:
    raise RequestError(f"'{name}' must be {'above' if open_low else 'at least'} {low} and at "
                       f"most {high}; got {value}.", name)
  return float(value)


def _bool(body, name):
  value = body.get(name, False)
  if value is None:
    return False
  if not isinstance(value, bool):
    raise RequestError(f"'{name}' must be true or false, not {json.dumps(value)}.", name)
  return value


def _token_list(value, vocab_size, where):
  if not all(type(t) is int for t in value):
    raise RequestError(f"{where} mixes token ids with other values; send a string, a list of "
                       f"strings, a list of token ids or a list of such lists.", "prompt")
  bad = [t for t in value if not 0 <= t < vocab_size]
  if bad:
    raise RequestError(f"{where} has token id {bad[0]}, outside the vocabulary of "
                       f"{vocab_size}.", "prompt")
  return list(value)


def parse_prompts(value, tokenizer):
  """[(text or None, token ids)] from the `prompt` field's four shapes."""
  if isinstance(value, str):
    return [(value, tokenizer.encode(value))]
  if not isinstance(value, list) or not value:
    raise RequestError("'prompt' must be a string, a non-empty list of strings, a list of "
                       "token ids or a list of token-id lists.", "prompt")
  if all(isinstance(p, str) for p in value):
    return [(p, tokenizer.encode(p)) for p in value]
  if all(isinstance(p, list) for p in value):
    return [(None, _token_list(p, tokenizer.vocab_size, f"prompt {i}"))
            for i, p in enumerate(value)]
  return [(None, _token_list(value, tokenizer.vocab_size, "'prompt'"))]


def parse_completion(body, tokenizer, max_len, model_name, max_prompt=None):
  """(prompts [(text, ids)], options dict, choices [Choice]) of a completions body;
  prompts of more than max_prompt tokens (default: any that fits max_len) are refused."""
  if not isinstance(body, dict):
    raise RequestError("the request body must be a JSON object.")
  unknown = sorted(set(body) - set(FIELDS))
  if unknown:
    raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(map(repr, unknown))}; the fields are {', '.join(FIELDS)}.",
                       unknown[0])
  for name, neutral in NEUTRAL.items():
    if body.get(name) not in neutral:
      raise RequestError(f"'{name}' is not supported by this server; leave it out.", name)
  if body.get("best_of") not in (None, body.get("n", 1)):
    raise RequestError("'best_of' is not supported by this server; use 'n'.", "best_of")
  model = body.get("model")
  if model is not None and model != model_name:
    raise RequestError(f"the model {json.dumps(model)} does not exist here; this server serves "
                       f"{json.dumps(model_name)}.", "model", 404, "not_found_error")
  if "prompt" not in body:
    raise RequestError("'prompt' is required.", "prompt")
  prompts = parse_prompts(body["prompt"], tokenizer)
  max_tokens = _int(body, "max_tokens", 16, 0)
  opts = {"max_tokens": max_tokens, "n": _int(body, "n", 1, 1, MAX_N),
          "echo": _bool(body, "echo"), "stream": _bool(body, "stream"),
          "logprobs": _int(body, "logprobs", None, 0, generate.LOGPROBS_MAX),
          "seed": _int(body, "seed", None, 0, 2**32 - 1)}
  top_k = _int(body, "top_k", 0, -1)
  sampling = generate.Sampling(_number(body, "temperature", 1.0, 0.0, 2.0), max(top_k, 0),
                               _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True))
  stop = body.get("stop")
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
    raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} strings.", "stop")
  seed = opts["seed"] if opts["seed"] is not None else int.from_bytes(os.urandom(4), "little")
  choices = []
  for i, (_, ids) in enumerate(prompts):
    if ids and ids[0] == tokenizer.bos_id:
      ids = ids[1:]
    if max_prompt is not None and len(ids) > max_prompt:
      raise RequestError(f"prompt {i} is {len(ids)} tokens; this server takes prompts of at "
                         f"most {max_prompt} tokens (--max_prompt_tokens); shorten it.",
                         "prompt")
    need = len(ids) + max(max_tokens, 1)  # the start token in, the last new token not fed back
    if need > max_len:
      raise RequestError(f"prompt {i} is {len(ids)} tokens; with the start token and max_tokens="
                         f"{max_tokens} it needs {need} of the context window's {max_len} "
                         f"positions; shorten it or ask for fewer tokens.", "prompt")
    for j in range(opts["n"]):
      choices.append(Choice(ids, max_tokens, sampling, (seed + 7919 * (i * opts["n"] + j)) % 2**32,
                            opts["logprobs"], opts["echo"], stop))
  return prompts, opts, choices


def _logprobs_block(tokenizer, ids, logprobs, tops, offsets):
  texts = [tokenizer.token_text(t) for t in ids]
  top = [None if t is None else {tokenizer.token_text(i): lp for i, lp in t} for t in tops]
  return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": top,
          "text_offset": offsets}


def choice_body(index, choice, prompt, tokenizer, echo, logprobs):
  """The response's entry for one finished choice."""
  text_prompt, ids = prompt
  prompt_text = (text_prompt if text_prompt is not None else tokenizer.decode(ids)) if echo else ""
  body = {"index": index, "text": prompt_text + choice.text, "logprobs": None,
          "finish_reason": choice.finish_reason if choice.finish_reason != "cancelled" else None}
  if logprobs is not None:
    block = _logprobs_block(tokenizer, choice.tokens, choice.token_logprobs, choice.top,
                            tokenizer.offsets(choice.tokens, len(prompt_text)))
    if echo:
      head = _logprobs_block(tokenizer, choice.prompt, choice.prompt_logprobs, choice.prompt_top,
                             tokenizer.offsets(choice.prompt))
      block = {k: head[k] + block[k] for k in block}
    body["logprobs"] = block
  return body


def completion_body(request_id, created, model_name, prompts, opts, choices, tokenizer, metadata):
  n = opts["n"]
  items = [choice_body(k, c, prompts[k // n], tokenizer, opts["echo"], opts["logprobs"])
           for k, c in enumerate(choices)]
  prompt_tokens = sum(len(c.prompt) for c in choices[::n])
  completion_tokens = sum(len(c.tokens) for c in choices)
  return {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
          "choices": items, "metadata": metadata,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}


def make_app(engine, tokenizer, model_name, metadata):
  """The FastAPI application; engine is a running serve.engine.Engine."""
  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse, StreamingResponse
  from starlette.exceptions import HTTPException

  app = FastAPI(title=f"bigsci_jax: {model_name}")
  max_len = engine.max_len

  def error(e):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(HTTPException)
  async def http_error(request, exc):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error(RequestError(f"{request.method} {request.url.path}: {exc.detail}.", None,
                              exc.status_code, kind))

  @app.exception_handler(RequestError)
  async def request_error(request, exc):
    return error(exc)

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, exc):
    return error(RequestError(f"the request does not fit the endpoint: {exc.errors()[:1]}."))

  async def json_body(request):
    raw = await request.body()
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RequestError(f"the request body is not valid JSON ({e}).") from e

  @app.get("/health")
  async def health():
    return {"status": "ok", **engine.status()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "bigsci_jax", "max_model_len": max_len,
                                        "max_prompt_tokens": engine.max_prompt,
                                        "metadata": metadata}]}

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    return {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
            "max_model_len": max_len, "vocab_size": tokenizer.vocab_size,
            "tokenizer_class": type(tokenizer).__name__, "add_bos_token": False}

  async def changed_or_timeout(changed):
    """Wait until the engine reports a change, at most 0.1 s (to look for a gone client)."""
    try:
      await asyncio.wait_for(changed.wait(), 0.1)
    except asyncio.TimeoutError:
      pass
    changed.clear()

  @app.post("/tokenize")
  async def tokenize(request: Request):
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
      raise RequestError("/tokenize takes {\"prompt\": string}.", "prompt")
    special = body.get("add_special_tokens", False)
    if not isinstance(special, bool):
      raise RequestError("'add_special_tokens' must be true or false.", "add_special_tokens")
    ids = ([tokenizer.bos_id] if special else []) + tokenizer.encode(body["prompt"])
    return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

  @app.post("/detokenize")
  async def detokenize(request: Request):
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
      raise RequestError("/detokenize takes {\"tokens\": [token ids]}.", "tokens")
    ids = _token_list(body["tokens"], tokenizer.vocab_size, "'tokens'")
    return {"prompt": tokenizer.decode(ids, special_tokens=True)}

  @app.post("/v1/completions")
  async def completions(request: Request):
    prompts, opts, choices = parse_completion(await json_body(request), tokenizer, max_len,
                                              model_name, engine.max_prompt)
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    job = Job(choices, lambda: loop.call_soon_threadsafe(changed.set))
    try:
      engine.submit(job)
    except (EngineBusy, EngineStopped) as e:
      return error(RequestError(str(e), None, 503, "server_error"))
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if opts["stream"]:
      return StreamingResponse(_stream(job, changed, request_id, created, prompts, opts),
                               media_type="text/event-stream")
    while not job.done:
      await changed_or_timeout(changed)
      if not job.done and await request.is_disconnected():
        job.cancel()
        return JSONResponse({}, status_code=499)
    if job.error:
      return error(RequestError(f"the model failed on this request: {job.error}", None, 500,
                                "server_error"))
    return completion_body(request_id, created, model_name, prompts, opts, choices, tokenizer,
                           metadata)

  async def _stream(job, changed, request_id, created, prompts, opts):
    """Server-sent events: with echo, one chunk per choice with its prompt; then chunks
    with each choice's new text (held back while it could still become the start of a
    stop string, or ends in half a character) and its finish reason; then [DONE]."""
    n, count = opts["n"], len(job.choices)
    sent_tokens, sent_text, final = [0] * count, [0] * count, [False] * count

    def chunk(k, text, block, reason):
      return "data: " + json.dumps({
          "id": request_id, "object": "text_completion", "created": created, "model": model_name,
          "choices": [{"index": k, "text": text, "logprobs": block,
                       "finish_reason": reason}]}) + "\n\n"

    try:
      if opts["echo"]:
        while opts["logprobs"] is not None and not job.done and any(
            c.prompt_logprobs is None for c in job.choices):
          await changed_or_timeout(changed)
        for k, c in enumerate(job.choices):
          text, ids = prompts[k // n]
          block = None
          if opts["logprobs"] is not None and c.prompt_logprobs is not None:
            block = _logprobs_block(tokenizer, c.prompt, c.prompt_logprobs, c.prompt_top,
                                    tokenizer.offsets(c.prompt))
          yield chunk(k, text if text is not None else tokenizer.decode(ids), block, None)
      while not all(final) and not job.error:
        done = job.done
        for k, c in enumerate(job.choices):
          if final[k]:
            continue
          with job.lock:
            tokens, text, reason = list(c.tokens), c.text, c.finish_reason
            lps, tops = list(c.token_logprobs), list(c.top)
          if not reason:  # the engine decodes a row's text when it ends
            text = tokenizer.decode(tokens)
          hold = 0 if reason else max([len(s) - 1 for s in c.stop] + [0])
          if not reason and text.endswith("\ufffd"):
            hold = max(hold, 1)
          ready = max(len(text) - hold, sent_text[k])
          if ready == sent_text[k] and not reason:
            continue
          block = None
          if opts["logprobs"] is not None:
            start = len(prompts[k // n][0] or "") if opts["echo"] else 0
            block = _logprobs_block(tokenizer, tokens[sent_tokens[k]:], lps[sent_tokens[k]:],
                                    tops[sent_tokens[k]:],
                                    tokenizer.offsets(tokens, start)[sent_tokens[k]:])
          yield chunk(k, text[sent_text[k]:ready], block,
                      reason if reason and reason != "cancelled" else None)
          sent_tokens[k], sent_text[k], final[k] = len(tokens), ready, reason is not None
        if not done:
          await changed_or_timeout(changed)
      if job.error:
        yield "data: " + json.dumps(RequestError(f"the model failed: {job.error}", None, 500,
                                                 "server_error").body()) + "\n\n"
      yield "data: [DONE]\n\n"
    finally:
      if not job.done:
        job.cancel()

  return app
