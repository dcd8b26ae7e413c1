"""`tapo plan`: the paper config's round on 8 x 80 GB, estimated from Qwen3-8B's shape, fits;
the same config without gradient checkpointing, or with engines on no GPU, is refused; the
shape's parameter count is a real model's."""

import json

import pytest
from transformers import Qwen3Config, Qwen3ForCausalLM

from pipeline.config import load_config
from tapo.cli import main
from tapo.flows.plan import make_plan
from trainer.memory import ModelShape, train_rank_bytes

QWEN3_8B = "configs/shapes/qwen3-8b.json"


def test_paper_config_fits_eight_80gb_gpus(capsys):
    assert main(["plan", "--config", "configs/math.yaml", "--shape", QWEN3_8B, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["problems"] == []
    assert plan["training"]["ranks"] == 8 and plan["training"]["gradient_checkpointing"]
    assert plan["training"]["peak_gb_per_rank"] < 0.9 * 80
    assert plan["sampling"]["engines"] == 8 and plan["sampling"]["idle_gpus"] == 0
    assert plan["model"]["parameters_b"] == pytest.approx(8.19, abs=0.01)  # Qwen3-8B: 8.2B
    # the cold start's SFT: OpenRLHF's on the 8 ranks, its longest example 25.6k tokens
    assert plan["coldstart"]["backend"] == "openrlhf" and plan["notes"] == []
    assert plan["training"]["peak_gb_per_rank"] < plan["coldstart"]["peak_gb_per_rank"] < 72


def test_a_plan_that_cannot_fit_is_refused(capsys):
    code = main(["plan", "--config", "configs/math.yaml", "--shape", QWEN3_8B,
                 "train.openrlhf_flags="])  # no gradient checkpointing
    out = capsys.readouterr().out
    assert code == 2 and "does not fit" in out and "gradient_checkpointing_enable" in out
    cfg = load_config("configs/math.yaml", ["runner.gpus_per_worker=0"])
    problems = make_plan(cfg, ModelShape.from_config_json(QWEN3_8B))["problems"]
    assert any("no GPU" in p for p in problems)
    cfg = load_config("configs/math.yaml", ["coldstart.openrlhf_flags="])
    problems = make_plan(cfg, ModelShape.from_config_json(QWEN3_8B))["problems"]
    assert [p for p in problems if p.startswith("cold-start SFT")]


def test_a_local_cold_start_at_8b_is_noted():
    """The local SFT would hold fp32 states of an 8B model (131 GB) on one GPU."""
    cfg = load_config("configs/math.yaml", ["train.backend=local"])
    plan = make_plan(cfg, ModelShape.from_config_json(QWEN3_8B))
    assert plan["coldstart"]["peak_gb_per_rank"] == pytest.approx(131, abs=1)
    assert any("train.backend=openrlhf" in n for n in plan["notes"])


def test_plan_needs_a_model_shape(capsys):
    assert main(["plan", "--config", "configs/math.yaml"]) == 1
    assert "--shape" in capsys.readouterr().err


def test_shape_counts_a_real_models_parameters(tmp_path):
    config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(tmp_path)
    shape = ModelShape.from_config_json(tmp_path)
    real = sum(p.numel() for p in model.parameters())
    assert shape.parameters == pytest.approx(real, rel=0.01)  # (Qwen3's q/k norms aside)


def test_checkpointing_and_zero_shrink_the_estimate_which_is_linear_in_tokens():
    shape = ModelShape.from_config_json(QWEN3_8B)

    def gb(tokens, zero=2, checkpointing=True):
        return train_rank_bytes(shape, tokens, 8, zero, checkpointing) / 1e9

    assert gb(16384, zero=3) < gb(16384) < gb(16384, checkpointing=False) / 2
    assert gb(32768) - gb(16384) == pytest.approx(2 * (gb(16384) - gb(8192)))


def test_a_hostfile_counts_every_nodes_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    cfg = load_config("configs/math.yaml", [f"train.hostfile={hostfile}"])
    plan = make_plan(cfg, ModelShape.from_config_json(QWEN3_8B))
    assert plan["training"]["nodes"] == 2 and plan["training"]["ranks"] == 16
