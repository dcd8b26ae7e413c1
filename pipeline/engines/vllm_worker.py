"""Runs inside vLLM's worker processes (`LLM(worker_extension_cls=...)`): loads a checkpoint of
the same architecture into the running model, for `VLLMEngine.load`. Reads the checkpoint."""

from __future__ import annotations


class CheckpointLoader:
    """Mixed into vLLM's worker class; `llm.collective_rpc("load_checkpoint", args=(path,))`."""

    def load_checkpoint(self, path: str) -> None:
        """vLLM's in-place `reload_weights` from `path`, then the LM head's kernel weights made
        anew. On CPU a linear layer keeps a packed copy of its weight (oneDNN/sgl) made when it
        was loaded; a head tied to the embeddings is not in the checkpoint, so vLLM 0.32 does not
        pack it again and it would keep the old model's weights (a reload from the testbed base
        then generated `26 * 3 = 168` where a new engine on the checkpoint says `158`)."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        self.reload_weights(weights_path=path)
        for module in self.model_runner.get_model().modules():
            if isinstance(module, ParallelLMHead):
                module.quant_method.process_weights_after_loading(module)
