"""run.trackers: a real two-round run on the small testbed sends each round and every
optimizer step, once, to CSV, TensorBoard event files and an offline Weights & Biases run, under
OpenRLHF's names; read back with TensorBoard's own reader and wandb's record format."""

import json
import struct

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tapo.flows.iterate import iterate
from tapo.flows.tracking import STEP_NAMES, step_scalars


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def wandb_records(path) -> list:
    """The protobuf records of a `.wandb` file (a LevelDB-style log: a 7-byte file header,
    32 KiB blocks of records, each a 7-byte header (crc, length, type) and its bytes; a record
    longer than its block continues in FIRST/MIDDLE/LAST pieces)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pieces, records = 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        pieces += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_history(run_dir) -> tuple[list[dict], dict]:
    """Every history row ({key: value}) of the run's offline files, and its config."""
    rows, config = [], {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                             for i in record.history.item})
            elif kind in ("run", "config"):  # the config as the run starts, its updates
                items = record.run.config.update if kind == "run" else record.config.update
                config.update({i.key: json.loads(i.value_json) for i in items})
    return rows, config


def test_trackers_get_every_round_and_step_once(small_base, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in, so offline
    run = tmp_path / "run"
    # round 1 with csv only; then the trackers are added: they get round 1 too
    iterate(run, 1, small_base("select.p_high=1"), progress=False)
    assert not (run / "tensorboard").exists()
    cfg = small_base("select.p_high=1", "run.trackers=[csv,tensorboard,wandb]")
    table = iterate(run, 2, cfg, progress=False)

    steps = pd.read_csv(run / "steps.csv")
    total = int(table["steps"].sum())
    assert list(steps["global_step"]) == list(range(1, total + 1))
    assert list(steps.groupby("round").size()) == list(table["steps"])

    scalars = tensorboard_scalars(run)
    for name in STEP_NAMES.values():
        assert [s for s, _ in scalars[f"train/{name}"]] == list(range(1, total + 1)), name
    assert [v for _, v in scalars["train/policy_loss"]] == pytest.approx(list(steps["loss"]))
    ends = list(table["steps"].cumsum())
    assert scalars["round/round"] == [(ends[0], 1.0), (ends[1], 2.0)]
    assert [v for _, v in scalars["train/reward"]] == pytest.approx(list(table["pass_rate"]))
    assert [v for _, v in scalars["round/augmented_share"]] == pytest.approx(
        list(table["augmented"] / table["training_rows"]))

    history, config = wandb_history(run)
    losses = [(r["train/global_step"], r["train/policy_loss"]) for r in history
              if "train/policy_loss" in r]
    assert losses == [(s, pytest.approx(v)) for s, v in zip(steps["global_step"], steps["loss"])]
    assert config["train"]["lr"] == cfg.train.lr and config["algo"]["name"] == "tapo"
    assert json.loads((run / "tracking.json").read_text())["wandb"] == 2

    # a run killed after round 2's events were written but before it was marked sent: the
    # re-run sends round 2 again, and TensorBoard shows each step once (purge_step)
    state = json.loads((run / "tracking.json").read_text())
    (run / "tracking.json").write_text(json.dumps({**state, "tensorboard": 1, "wandb": 2}))
    iterate(run, 2, cfg, progress=False)
    again = tensorboard_scalars(run)
    assert [s for s, _ in again["train/policy_loss"]] == list(range(1, total + 1))
    assert again["round/round"] == scalars["round/round"]
    assert len(wandb_history(run)[0]) == len(history)  # wandb was marked sent: nothing re-sent


def test_the_loss_is_named_policy_loss_only_without_kl():
    step = {"step": 1, "loss": 0.5, "clip_fraction": 0.1, "lr": 1e-4}
    assert step_scalars(step, kl_coef=0.0)["train/policy_loss"] == 0.5
    with_kl = step_scalars(step, kl_coef=0.1)
    assert "train/policy_loss" not in with_kl and with_kl["train/loss"] == 0.5
