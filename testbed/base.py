"""The CPU testbed: arith splits, a locally trained tokenizer and a tiny Qwen2 base model.

`build_base(cfg, base_dir)` writes, deterministically from `cfg` (seeded):

    base_dir/data/{pretrain,train,heldout}.parquet   problems (disjoint by construction)
    base_dir/model/                                 HF model + tokenizer (save_pretrained),
                                                    optimizer.pt: the pretraining's last Adam
                                                    moments, which RL continues (trainer/rl.py)
    base_dir/build.json                             config, fingerprint, losses, timings,
                                                    the held-out targets (measure_base), and
                                                    the extra steps a weak build took
    base_dir/_SUCCESS                               written last; a rebuild with the same
                                                    fingerprint is a no-op

A build is deterministic on one machine and thread count but not across CPUs (float kernels
differ), so the default and the small base ship with the repo (`data/testbed_base*/`): a config
with the fingerprint of one is installed from there (its problems generated, which is exact on every
machine) instead of trained. `rebuild_base` trains it anew and `compare_bases` says whether the
rebuild matches the shipped weights and, if not, by how much on the held-out targets.

The base is pretrained on `pretrain_solutions`: the reference solutions, some of them misread
with operator precedence and some of those self-corrected (`testbed.misread_share`,
`testbed.reflect_share`), so that it has a habit RL can train away and knows reflection's words.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from pipeline.completion import DONE, mark_complete
from pipeline.config import TestbedConfig
from pipeline.engines.base import SamplingParams
from pipeline.engines.hf import HFEngine
from pipeline.io import write_table_atomic
from pipeline.layout import OPTIMIZER, testbed_model, testbed_split
from pipeline.util import fingerprint, weights_sha256, write_json_atomic
from stages.tasks import arith
from stages.tasks.base import split_steps
from stages.tasks.prompts import (
    ANALYSIS,
    CONSTRUCT_INSTRUCTION,
    LOCATE_INSTRUCTION,
    RECONSTRUCTION,
    STEP_TAG,
    WHAT,
    construct_answer,
    construct_instruction,
    locate_answer,
    locate_instruction,
)
from trainer.lm import LMExample, TrainSchedule, train_lm

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, "<|im_start|>", "<|im_end|>"]
GREEDY_TARGET = 0.25  # below it the base is too weak for the testbed: pretrain further
EXTRA_CHUNK = 700  # steps added at a time (at lr / 10) while below the target
DATA = Path(__file__).resolve().parents[1] / "data"
SHIPPED_BASE = DATA / "testbed_base"  # configs/testbed.yaml's; testbed_base_small: the small one
SHIPPED_BASES = tuple(sorted(DATA.glob("testbed_base*")))
BUILD = "build.json"
JUDGE_PHASE = 2  # the judge phase's version (2: the judges' words as tokens of their own)


def problem_rows(problems: list[arith.ArithProblem], split: str) -> pd.DataFrame:
    """The problems table shared by every task: id, problem, answer, solution, split, source."""
    return pd.DataFrame(
        {
            "problem_id": [p.problem_id for p in problems],
            "problem": [p.text for p in problems],
            "answer": [str(p.answer) for p in problems],
            "solution": [p.solution() for p in problems],
            "split": split,
            "source": "arith",
        }
    )


def pretrain_solutions(problems: list[arith.ArithProblem], cfg: TestbedConfig) -> list[str]:
    """The solution the base is pretrained on, per problem: the reference, or (a seeded
    `misread_share` of them) the precedence misreading, of which a `reflect_share` catches its
    own error and finishes correctly. A misread problem without `*` after `+`/`-` stays the
    reference (both readings agree)."""
    rng = random.Random(f"pretrain-solutions-{cfg.seed}")
    texts = []
    for p in problems:
        text = p.solution()
        if rng.random() < cfg.misread_share:
            text = arith.precedence_solution(p)
            if rng.random() < cfg.reflect_share:
                text = arith.self_corrected(p, text)
        texts.append(text)
    return texts


def corpus_counts(problems: list[arith.ArithProblem], texts: list[str]) -> dict[str, int]:
    """How many pretraining solutions are references, misread, or self-corrected."""
    counts = {"reference": 0, "misread": 0, "self_corrected": 0}
    for p, text in zip(problems, texts, strict=True):
        kind = ("reference" if text == p.solution()
                else "self_corrected" if arith.REFLECTION_PREFIX in text else "misread")
        counts[kind] += 1
    return counts


JUDGE_KINDS = ("misread", "slip", "copy")


def judge_examples(problems: list[arith.ArithProblem], cfg: TestbedConfig) -> list[dict]:
    """Examples (kind, problem, wrong, prompt, answer) that teach the base to locate a failure
    and to construct the trajectory, as the stages ask it (stages/tasks/prompts.py; a model
    without a chat template reads the instruction and a newline). For a seeded `judge_share` of
    `problems`: a wrong solution (`arith.wrong_solution`, a misreading, a slip or a copy error in
    equal shares; a quarter of the slips and copies after a caught misreading), shown with the
    reference, and answered by the exact checker: `locate` gives its first wrong line,
    `construct` the rule constructor's diagnosis and remaining steps (`construct_full`, one in
    four: the whole solution, the ablation's prompt)."""
    rng = random.Random(f"judge-examples-{cfg.seed}")
    task = arith.ArithTask()
    out = []
    for p in problems:
        if rng.random() >= cfg.judge_share:
            continue
        kind = rng.choice(JUDGE_KINDS)
        if kind == "misread" and arith.precedence_solution(p) == p.solution():
            kind = "slip"
        wrong = arith.wrong_solution(p, rng, kind, caught_first=rng.random() < 0.25)
        steps, reference = split_steps(wrong), split_steps(p.solution())
        error = arith.first_wrong_step(p, wrong)
        k = error.step.index
        out.append({"kind": "locate", "problem": p.text, "wrong": wrong,
                    "prompt": locate_instruction(p.text, steps, reference) + "\n",
                    "answer": locate_answer(k)})
        _, diagnosis, correction = task.repair(p.text, wrong[: error.step.end], error.step,
                                               full=False)
        analysis = diagnosis.strip().split(" is wrong: ", 1)[1]
        full = rng.random() < 0.25
        mode = "full_reconstruction" if full else "prefix"
        out.append({"kind": "construct_full" if full else "construct", "problem": p.text,
                    "wrong": wrong,
                    "prompt": construct_instruction(k, p.text, steps, reference, mode) + "\n",
                    "answer": construct_answer(analysis, p.solution() if full else correction)})
    return out


JUDGE_PIECE = re.compile(r"</?[a-z]+>| ?[A-Za-z]+")  # a tag, or a word with its leading space


def judge_tokens(tokenizer, solver_texts: Iterable[str]) -> list[str]:
    """The judges' tags and the words of their instructions (stages/tasks/prompts.py, each with
    its leading space where it has one) that the tokenizer spells in more than one token and
    that occur nowhere in the solver's texts (an added token matches inside longer words too),
    so that they can become tokens of their own without changing how the solver's own text is
    read."""
    instructions = LOCATE_INSTRUCTION + CONSTRUCT_INSTRUCTION + " ".join(WHAT.values())
    solver = "\n".join(solver_texts)  # (no piece holds a newline)
    return sorted(piece for piece in set(JUDGE_PIECE.findall(instructions))
                  if piece not in solver
                  and len(tokenizer(piece, add_special_tokens=False)["input_ids"]) > 1)


def add_judge_tokens(model, tokenizer, tokens: list[str], moments: Path) -> None:
    """`tokens` into the tokenizer (added tokens, matched before the byte-level pieces), the
    tied embedding grown to a multiple of 64 rows, each new token's row the mean of the rows
    that spelled it, each new padding row the mean of the old padding rows (never a target);
    the Adam moments at `moments` grown with zero rows to match."""
    spelled = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tokens]
    old_tokens = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in tokens])
    embedding = model.get_input_embeddings().weight
    index = next(i for i, p in enumerate(model.parameters()) if p is embedding)
    old_rows = embedding.shape[0]
    padding = embedding[old_tokens:].detach().mean(0) if old_rows > old_tokens else 0.0
    model.resize_token_embeddings(-(-len(tokenizer) // 64) * 64, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        for token, ids in zip(tokens, spelled, strict=True):
            weight[tokenizer.convert_tokens_to_ids(token)] = weight[ids].mean(0)
        weight[len(tokenizer):] = padding
    state = torch.load(moments, map_location="cpu")
    grow = weight.shape[0] - old_rows
    for key in ("exp_avg", "exp_avg_sq"):
        t = state["state"][index][key]
        state["state"][index][key] = torch.cat([t, t.new_zeros(grow, *t.shape[1:])])
    torch.save(state, moments)


def teach_judges(model, tokenizer, judges: list[dict], solutions: list[LMExample],
                 cfg: TestbedConfig, moments: Path) -> list[float]:
    """The judge phase after pretraining: `judge_steps` steps at `judge_lr` (continuing the
    pretraining moments at `moments`) on the judge examples and as many pretraining solutions
    (seeded; so solving is rehearsed, not forgotten), a batch holding one kind; returns the
    losses."""
    rehearsal = random.Random(f"rehearsal-{cfg.seed}").sample(solutions, len(judges))
    examples = rehearsal + sft_examples(tokenizer, [j["prompt"] for j in judges],
                                        [j["answer"] for j in judges])
    groups = ["solution"] * len(rehearsal) + [j["kind"] for j in judges]
    sched = TrainSchedule(steps=cfg.judge_steps, batch_size=cfg.batch_size, lr=cfg.judge_lr,
                          seed=cfg.seed + 100)
    return train_lm(model, examples, sched, tokenizer.pad_token_id, desc="teach the judges",
                    optimizer_in=moments, optimizer_out=moments, groups=groups)


def measure_judges(engine, problems: list[arith.ArithProblem], cfg: TestbedConfig,
                   share: float = 1.0) -> dict:
    """The base as its own judge on the judge examples of a `share` of `problems` (1: held-out
    problems' fresh errors, one example of each kind per problem; `cfg.judge_share` of the
    first pretraining problems: the very examples the judge phase trained on), answered
    greedily: the share of locate answers that name the exact checker's step (by error kind
    too), and of construct answers: in both tags, whose trajectory grades correct, whose
    reconstruction starts with the expected line, and whose diagnosis is the expected one word
    for word."""
    examples = judge_examples(problems, cfg.model_copy(update={"judge_share": share}))
    answers = engine.generate([e["prompt"] for e in examples], 1,
                              SamplingParams(temperature=0, max_tokens=200))
    located, kinds = [], {}
    built = {"tagged": [], "correct": [], "first_line": [], "diagnosis": []}
    for e, [answer] in zip(examples, answers, strict=True):
        p = arith.parse_problem(e["problem"])
        error = arith.first_wrong_step(p, e["wrong"])
        if e["kind"] == "locate":
            m = STEP_TAG.search(answer.text)
            exact = m is not None and int(m.group(1)) == error.step.index
            located.append(exact)
            kinds.setdefault(arith.error_kind(p, error.found, error.expected), []).append(exact)
            continue
        got = [RECONSTRUCTION.search(answer.text), ANALYSIS.search(answer.text)]
        want = [RECONSTRUCTION.search(e["answer"]), ANALYSIS.search(e["answer"])]
        built["tagged"].append(None not in got)
        if None in got:
            for key in ("correct", "first_line", "diagnosis"):
                built[key].append(False)
            continue
        prefix = "" if e["kind"] == "construct_full" else e["wrong"][: error.step.end]
        lines = [m.group(1).strip().split("\n", 1)[0] for m in (got[0], want[0])]
        built["correct"].append(arith.grade(prefix + "\n" + got[0].group(1).strip(),
                                            str(p.answer))[0] == "correct")
        built["first_line"].append(lines[0] == lines[1])
        built["diagnosis"].append(got[1].group(1).strip() == want[1].group(1).strip())
    return {"locate_exact": sum(located) / len(located),
            "locate_exact_by_kind": {k: round(sum(v) / len(v), 4) for k, v in kinds.items()},
            **{f"construct_{k}": sum(v) / len(v) for k, v in built.items()},
            "problems": len(located)}


def tokenizer_corpus(problems: list[arith.ArithProblem]) -> list[str]:
    """Problems, solutions and a reflection sentence on every tenth: the text the testbed model
    will see (the judge prompts' English is spelled in the byte-level tokens). The sentence
    keeps its first wording, so that a rebuild of a shipped base gets its tokenizer."""
    texts = []
    for i, p in enumerate(problems):
        texts.append(arith.PROMPT_TEMPLATE.format(problem=p.text) + p.solution())
        if i % 10 == 0:
            k = 1 + i % len(p.ops)
            texts.append(arith.first_reflection_line(k, p.step_line(k) + "1", p.step_line(k)))
    return texts


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with every digit its own token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )


def make_model(cfg: TestbedConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    torch.manual_seed(cfg.seed)
    vocab = -(-len(tokenizer) // 64) * 64  # padded to a multiple of 64
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def sft_examples(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], responses: list[str]
) -> list[LMExample]:
    """Tokenized (prompt, response + EOS) pairs."""
    eos = tokenizer.eos_token_id
    return [
        LMExample(
            tokenizer(p, add_special_tokens=False)["input_ids"],
            tokenizer(r, add_special_tokens=False)["input_ids"] + [eos],
        )
        for p, r in zip(prompts, responses, strict=True)
    ]


def base_fingerprint(cfg: TestbedConfig) -> str:
    """The build's identity: its config without the location (and without the corpus knobs
    while they are 0, and the judge phase's without judges, so that a base built before they
    existed stays current); with judges, the judge phase's version (JUDGE_PHASE)."""
    unset = {k for k in ("misread_share", "reflect_share", "judge_share") if not getattr(cfg, k)}
    if not cfg.judge_share:
        unset |= {"judge_steps", "judge_lr"}
    identity = cfg.model_dump(mode="json", exclude={"base_dir"} | unset)
    if cfg.judge_share:
        identity["judge_phase"] = JUDGE_PHASE
    return fingerprint(identity)


def base_is_current(cfg: TestbedConfig, base_dir: str | Path) -> bool:
    """Whether base_dir holds a complete build of this config (with its Adam moments: a build
    from before they were saved is rebuilt)."""
    done = Path(base_dir) / DONE
    return (done.exists() and (testbed_model(base_dir) / OPTIMIZER).exists()
            and json.loads(done.read_text()).get("fingerprint") == base_fingerprint(cfg))


def write_splits(cfg: TestbedConfig, base_dir: Path) -> dict[str, list[arith.ArithProblem]]:
    """Generates the pretrain, train and held-out problems into base_dir/data/ (pure Python:
    the same on every machine) and returns them."""
    splits = {
        "pretrain": arith.generate_split("pretrain", cfg.n_pretrain, cfg.seed, cfg.arith),
        "train": arith.generate_split("train", cfg.n_train, cfg.seed, cfg.arith),
        "heldout": arith.generate_split("heldout", cfg.n_heldout, cfg.seed, cfg.arith),
    }
    for name, problems in splits.items():
        write_table_atomic(problem_rows(problems, name), testbed_split(base_dir, name))
    return splits


def testbed_problems(cfg: TestbedConfig, split: str) -> Path:
    """The parquet of a testbed split; generated first (write_splits: pure Python, seconds) when
    the base directory has none yet, as for a run of another model on the arith task, which
    needs the problems and not the testbed's model."""
    path = testbed_split(cfg.base_dir, split)
    if not path.exists():
        write_splits(cfg, Path(cfg.base_dir))
    return path


def splits_sha256(base_dir: Path) -> dict[str, str]:
    """A hash of each split's (problem_id, problem, answer, solution): the problems a model was
    built on, independent of parquet's bytes."""
    out = {}
    for split in ("pretrain", "train", "heldout"):
        df = pd.read_parquet(testbed_split(base_dir, split),
                             columns=["problem_id", "problem", "answer", "solution"])
        out[split] = hashlib.sha256("\n".join(
            "\t".join(row) for row in df.itertuples(index=False)).encode()).hexdigest()
    return out


def shipped_base(cfg: TestbedConfig, shipped: Iterable[Path] = SHIPPED_BASES) -> Path | None:
    """The shipped base directory built from this config (same fingerprint), if any."""
    fp = base_fingerprint(cfg)
    for d in shipped:
        if (d / BUILD).exists() and json.loads((d / BUILD).read_text())["fingerprint"] == fp:
            return d
    return None


def build_base(cfg: TestbedConfig, base_dir: str | Path, force: bool = False,
               shipped: Iterable[Path] = SHIPPED_BASES) -> Path:
    """Builds (or finds complete) the testbed base; returns the model directory. A config the
    shipped base was built from installs it (`install_base`) unless `force`; else the model
    is trained (`train_base`)."""
    base_dir = Path(base_dir)
    if not force and base_is_current(cfg, base_dir):
        return testbed_model(base_dir)
    if base_dir.exists():
        shutil.rmtree(base_dir)
    source = None if force else shipped_base(cfg, shipped)
    if source is not None:
        return install_base(cfg, base_dir, source)
    return train_base(cfg, base_dir, shipped)


def install_base(cfg: TestbedConfig, base_dir: Path, shipped: Path) -> Path:
    """Writes the shipped base into base_dir: its problems generated (and checked against the
    hashes it was built on), its model and build.json copied; _SUCCESS last."""
    t0 = time.time()
    write_splits(cfg, base_dir)
    build = json.loads((shipped / BUILD).read_text())
    if (have := splits_sha256(base_dir)) != build["splits_sha256"]:
        raise RuntimeError(f"the shipped base {shipped} was built on other problems than this "
                           f"code generates ({have} vs {build['splits_sha256']}): rebuild it "
                           "with `tapo base --rebuild` and ship the rebuild")
    shutil.copytree(testbed_model(shipped), testbed_model(base_dir))
    build["installed_from"] = str(shipped)
    build["seconds"]["install"] = round(time.time() - t0, 1)
    write_json_atomic(base_dir / BUILD, build)
    mark_complete(base_dir, build["fingerprint"])
    return testbed_model(base_dir)


def train_base(cfg: TestbedConfig, base_dir: Path,
               shipped: Iterable[Path] = SHIPPED_BASES) -> Path:
    """Generates the splits, trains the tokenizer, pretrains the model (with extra steps while
    below the greedy target), measures it and writes build.json; _SUCCESS last. With judges
    (`judge_share`), the pretrained model is the solver base, built (or found complete) beside
    it (`solver_dir`: the same config without judges; installed from `shipped` when one of
    them was built from it), and then learns the judges' prompts."""
    if cfg.judge_share:
        return train_judges(cfg, base_dir, shipped)
    fp = base_fingerprint(cfg)
    t0 = time.time()
    splits = write_splits(cfg, base_dir)
    t_data = time.time() - t0

    pretrain = splits["pretrain"]
    tokenizer = train_tokenizer(tokenizer_corpus(pretrain), cfg.vocab_size)
    model = make_model(cfg, tokenizer)
    solutions = pretrain_solutions(pretrain, cfg)
    examples = sft_examples(
        tokenizer, [arith.PROMPT_TEMPLATE.format(problem=p.text) for p in pretrain], solutions
    )
    t1 = time.time()
    sched = TrainSchedule(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    moments = base_dir / OPTIMIZER  # the Adam moments of the last step, for RL to continue
    losses = train_lm(model, examples, sched, tokenizer.pad_token_id, desc="pretrain base",
                      optimizer_out=moments)
    heldout = problem_rows(splits["heldout"], "heldout")
    t2 = time.time()
    metrics = measure_base(HFEngine(model, tokenizer, batch_size=200), heldout)
    t_measure = time.time() - t2
    extra = 0  # float results differ across CPUs (AVX2 vs AVX-512 kernels), and so do builds
    while metrics["greedy_accuracy"] < GREEDY_TARGET and extra < cfg.max_extra_steps:
        more = TrainSchedule(steps=min(EXTRA_CHUNK, cfg.max_extra_steps - extra),
                             batch_size=cfg.batch_size, lr=cfg.lr / 10,
                             seed=cfg.seed + 1 + extra // EXTRA_CHUNK)
        losses += train_lm(model, examples, more, tokenizer.pad_token_id,
                           desc="pretrain base (below target: more steps)",
                           optimizer_out=moments)
        extra += more.steps
        t3 = time.time()
        metrics = measure_base(HFEngine(model, tokenizer, batch_size=200), heldout)
        t_measure += time.time() - t3
    t_train = time.time() - t1 - t_measure
    save_model(model, tokenizer, moments, base_dir)
    write_json_atomic(
        base_dir / BUILD,
        {
            "fingerprint": fp,
            "config": cfg.model_dump(mode="json"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer),
            "pretrain_solutions": corpus_counts(pretrain, solutions),
            "seconds": {"data": round(t_data, 1), "pretrain": round(t_train, 1),
                        "measure": round(t_measure, 1)},
            "heldout": metrics,
            "extra_steps": extra,
            "splits_sha256": splits_sha256(base_dir),
            "weights_sha256": weights_sha256(testbed_model(base_dir)),
            "loss_first": losses[0],
            "loss_last": sum(losses[-20:]) / len(losses[-20:]),
        },
    )
    mark_complete(base_dir, fp)
    return testbed_model(base_dir)


def solver_dir(base_dir: Path) -> Path:
    """Where a base with judges keeps its solver base: BASE_DIR-solver."""
    return base_dir.with_name(base_dir.name + "-solver")


def train_judges(cfg: TestbedConfig, base_dir: Path,
                 shipped: Iterable[Path] = SHIPPED_BASES) -> Path:
    """The base with judges: the solver base (this config without judges, `solver_dir`,
    installed, built or found complete) copied, given the judges' words as tokens
    (add_judge_tokens), taught the judges (teach_judges), measured (held-out targets and
    measure_judges); build.json holds the solver's record under `solver`."""
    solver_cfg = cfg.model_copy(update={"judge_share": 0.0})
    solver = solver_dir(base_dir)
    build_base(solver_cfg, solver, shipped=shipped)
    t0 = time.time()
    splits = write_splits(cfg, base_dir)
    solver_build = json.loads((solver / BUILD).read_text())
    if splits_sha256(base_dir) != solver_build["splits_sha256"]:
        raise RuntimeError(f"the solver base {solver} holds other problems")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(testbed_model(solver))
    model = Qwen2ForCausalLM.from_pretrained(testbed_model(solver), dtype=torch.float32)
    moments = base_dir / OPTIMIZER
    shutil.copy(testbed_model(solver) / OPTIMIZER, moments)
    pretrain = splits["pretrain"]
    texts = pretrain_solutions(pretrain, cfg)
    prompts = [arith.PROMPT_TEMPLATE.format(problem=p.text) for p in pretrain]
    tokens = judge_tokens(tokenizer, prompts + texts)
    add_judge_tokens(model, tokenizer, tokens, moments)
    judges = judge_examples(pretrain, cfg)
    solutions = sft_examples(tokenizer, prompts, texts)
    t1 = time.time()
    losses = teach_judges(model, tokenizer, judges, solutions, cfg, moments)
    t2 = time.time()
    engine = HFEngine(model, tokenizer, batch_size=200)  # (as measure_base always runs)
    metrics = measure_base(engine, problem_rows(splits["heldout"], "heldout"))
    judge_metrics = measure_judges(engine, splits["heldout"], cfg)
    t3 = time.time()
    save_model(model, tokenizer, moments, base_dir)
    write_json_atomic(
        base_dir / BUILD,
        {
            "fingerprint": base_fingerprint(cfg),
            "config": cfg.model_dump(mode="json"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer),
            "judge_tokens": tokens,
            "pretrain_solutions": solver_build["pretrain_solutions"],
            "judge_examples": dict(Counter(j["kind"] for j in judges)),
            "seconds": {"data": round(t1 - t0, 1), "judges": round(t2 - t1, 1),
                        "measure": round(t3 - t2, 1)},
            "heldout": metrics,
            "judges": judge_metrics,
            "solver": {k: solver_build[k] for k in ("fingerprint", "weights_sha256", "heldout",
                                                     "seconds", "extra_steps")},
            "extra_steps": solver_build["extra_steps"],
            "splits_sha256": solver_build["splits_sha256"],
            "weights_sha256": weights_sha256(testbed_model(base_dir)),
            "loss_first": losses[0],
            "loss_last": sum(losses[-20:]) / len(losses[-20:]),
        },
    )
    mark_complete(base_dir, base_fingerprint(cfg))
    return testbed_model(base_dir)


def save_model(model, tokenizer, moments: Path, base_dir: Path) -> None:
    """The model, tokenizer (with generation's EOS and pad) and Adam moments into
    base_dir/model."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(testbed_model(base_dir))
    tokenizer.save_pretrained(testbed_model(base_dir))
    moments.replace(testbed_model(base_dir) / OPTIMIZER)


def rebuild_base(cfg: TestbedConfig, out_dir: Path,
                 shipped: Iterable[Path] = SHIPPED_BASES) -> dict:
    """Trains the shipped base of this config anew into out_dir and compares the two builds
    (compare_bases); writes out_dir/rebuild.json and returns it."""
    if (source := shipped_base(cfg, shipped)) is None:
        raise ValueError("no shipped base was built from this config")
    build_base(cfg, out_dir, force=True)
    report = compare_bases(source, out_dir)
    write_json_atomic(Path(out_dir) / "rebuild.json", report)
    return report


def compare_bases(shipped: Path, rebuilt: Path) -> dict:
    """Two builds of one config: whether their weights and tokenizer are identical, the largest
    weight difference, and their held-out targets side by side (rebuilt - shipped)."""
    from safetensors.torch import load_file

    a = load_file(testbed_model(shipped) / "model.safetensors")
    b = load_file(testbed_model(rebuilt) / "model.safetensors")
    differing = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    max_diff = max(((a[k] - b[k]).abs().max().item() for k in differing if k in b), default=0.0)
    held = [json.loads((d / BUILD).read_text())["heldout"] for d in (shipped, rebuilt)]
    tokenizer = [(testbed_model(d) / "tokenizer.json").read_bytes() for d in (shipped, rebuilt)]
    return {
        "identical": not differing and tokenizer[0] == tokenizer[1],
        "tokenizer_identical": tokenizer[0] == tokenizer[1],
        "tensors": len(a), "tensors_differing": len(differing), "max_abs_diff": max_diff,
        "heldout": {k: {"shipped": held[0][k], "rebuilt": held[1][k],
                        "diff": round(held[1][k] - held[0][k], 6)}
                    for k in held[0] if isinstance(held[0][k], float)},
        "shipped": str(shipped), "rebuilt": str(rebuilt),
    }


def measure_base(engine, heldout: pd.DataFrame, n: int = 8, max_tokens: int = 160) -> dict:
    """The testbed targets on the held-out set: greedy accuracy, and the share of problems whose
    pass rate over `n` samples at temperature 1.0 lies strictly between 0 and 1; and the share
    of those samples that misread the problem with operator precedence."""
    prompts = [arith.PROMPT_TEMPLATE.format(problem=p) for p in heldout["problem"]]
    answers = list(heldout["answer"])
    sampled = engine.generate(
        prompts, n, SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=1)
    )
    rates = [
        sum(arith.grade(c.text, a)[0] == "correct" for c in group) / n
        for group, a in zip(sampled, answers)
    ]
    problems = [arith.parse_problem(p) for p in heldout["problem"]]
    misread = sum(arith.reads_with_precedence(p, c.text)
                  for p, group in zip(problems, sampled) for c in group)
    return {
        "greedy_accuracy": greedy_accuracy(engine, heldout, max_tokens),
        "sampled_accuracy": sum(rates) / len(rates),
        "mixed_share": sum(0 < r < 1 for r in rates) / len(rates),
        "all_wrong_share": sum(r == 0 for r in rates) / len(rates),
        "misread_share": misread / (n * len(rates)),
        "n_problems": len(rates),
        "samples_per_problem": n,
    }


def greedy_accuracy(engine, heldout: pd.DataFrame, max_tokens: int = 160) -> float:
    """The share of held-out problems the engine's greedy answer solves."""
    prompts = [arith.PROMPT_TEMPLATE.format(problem=p) for p in heldout["problem"]]
    out = engine.generate(prompts, 1, SamplingParams(temperature=0, max_tokens=max_tokens))
    return sum(arith.grade(c[0].text, a)[0] == "correct"
               for c, a in zip(out, heldout["answer"])) / len(heldout)
