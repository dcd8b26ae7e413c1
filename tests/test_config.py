from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    load_config,
    section_fingerprint,
    write_resolved,
)


def test_default_config_loads():
    cfg = load_config()
    assert cfg.task.name == "arith" and cfg.run.name == "testbed"


def test_overrides_are_typed():
    cfg = load_config(None, ["testbed.steps=7", "testbed.arith.ops=+-", "run.name=x1"])
    assert cfg.testbed.steps == 7 and cfg.testbed.arith.ops == "+-" and cfg.run.name == "x1"


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["testbed.stepz=3"])
    msg = str(e.value)
    assert "testbed.stepz" in msg and "steps" in msg and "hidden_size" in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  nmae: a\n")
    with pytest.raises(ConfigError, match=r"unknown key 'run.nmae'; allowed: name, root, seed"):
        load_config(p)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["task.name=chess"])
    assert "task.name" in str(e.value) and "'arith'" in str(e.value) and "'math'" in str(e.value)


def test_bad_value_type_and_range():
    with pytest.raises(ConfigError, match="testbed.steps"):
        load_config(None, ["testbed.steps=many"])
    with pytest.raises(ConfigError, match="testbed.arith.min_steps"):
        load_config(None, ["testbed.arith.min_steps=0"])
    with pytest.raises(ConfigError, match="min_steps .* > max_steps"):
        load_config(None, ["testbed.arith.min_steps=9", "testbed.arith.max_steps=4"])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["testbed.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_fingerprint_stable_and_section_scoped():
    a, b = load_config(), load_config()
    assert section_fingerprint(a, ["testbed"]) == section_fingerprint(b, ["testbed"])
    c = load_config(None, ["run.name=other"])
    assert section_fingerprint(a, ["testbed"]) == section_fingerprint(c, ["testbed"])
    assert section_fingerprint(a, ["run"]) != section_fingerprint(c, ["run"])


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config(None, ["testbed.steps=11"])
    path = write_resolved(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["testbed"]["steps"] == 11 and "runner" in data
    assert Config.model_validate(data) == cfg
    assert load_config(path) == cfg


def test_shipped_configs_validate():
    for path in DEFAULT_CONFIG.parent.glob("*.yaml"):
        load_config(path)


def test_off_is_a_word_not_a_boolean(tmp_path):
    assert load_config(None, ["algo.ood=off"]).algo.ood == "off"
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  ood: off\n")
    assert load_config(path).algo.ood == "off"
    assert load_config(None, ["algo.dae=false"]).algo.dae is False


def test_the_paper_scale_config_validates():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "math.yaml")
    assert (cfg.task.name, cfg.locate.method, cfg.construction.method) == ("math", "llm", "llm")
    assert (cfg.coldstart.size, cfg.eval.n, cfg.rollout.group_size) == (45000, 16, 8)


def _leaves(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _leaves(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_config_key_says_what_it_is():
    from pipeline.config import Config

    assert [key for key, field in _leaves(Config) if not field.description] == []


def test_every_config_key_the_readme_names_exists():
    """The docs and the config cannot drift apart: each `section.key` the README, docs/ or the
    changelog name is a key."""
    import re
    from pathlib import Path

    from pipeline.config import Config

    keys = {key for key, _ in _leaves(Config)}
    sections = "|".join(Config.model_fields)
    root = Path(__file__).resolve().parent.parent
    readme = "\n".join(p.read_text() for p in [root / "README.md", root / "CHANGELOG.md",
                                                 *sorted((root / "docs").glob("*.md"))])
    found = re.findall(rf"(?<![\w/.-])((?:{sections})\.[a-z_]+(?:\.[a-z_]+)*)(?![\w(])", readme)
    files = ("json", "yaml", "parquet", "log", "jsonl", "csv", "md", "png")
    named = {n for n in found if n.rsplit(".", 1)[1] not in files}  # (not `coldstart.json`)
    assert len(named) > 30  # (the README names many of them; OpenRLHF's --flags are not ours)
    assert sorted(named - keys) == []


def test_a_hostfile_needs_the_deepspeed_launcher():
    with pytest.raises(ConfigError, match="hostfile is read by the deepspeed launcher only"):
        load_config(None, ["train.launcher=torchrun", "train.hostfile=/etc/hosts"])
    assert load_config(None, ["train.hostfile=/etc/hosts"]).train.hostfile == "/etc/hosts"


def test_the_paper_config_trains_gently_and_saves_once_a_round():
    """configs/math.yaml: a learning rate for full-parameter RL on an 8B model, and no DeepSpeed
    state (about 130 GB at 8B) before a round's last step, even with every augmentation."""
    import math

    cfg = load_config(Path("configs/math.yaml"))
    assert cfg.train.lr <= 1e-5
    r = cfg.rollout
    rows = r.problems_per_round * r.group_size * (1 + cfg.select.budget_fraction)
    assert cfg.train.save_every >= math.ceil(rows / cfg.train.mini_batch_size)


def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from the config's own field descriptions."""
    from tapo.flows.config_reference import DOC, reference

    assert DOC.read_text() == reference(), \
        "docs/configuration.md is stale: run python -m tapo.flows.config_reference"
    assert "| `train.backend` |" in reference() and "## `coldstart`" in reference()
