"""The receiving end of a weight sync, inside vLLM's worker: a worker extension (vLLM's
`worker_extension_cls`, which mixes these methods into its worker) that loads the policy's weights bucket by
bucket through vLLM's in-place layer-wise reload.

    aligner_begin_weights()              # every layer waits for its new weights
    aligner_load_bucket(meta, payload)   # a packed bucket (aligner.rollout.weights.pack_bucket), base64 text
    aligner_load_tensors(pairs)          # or (name, tensor) pairs, from the same process (colocated vLLM)
    aligner_end_weights()                # the backend's post-load processing for what is left; caches reset

A layer is processed (repacked, quantized where the backend does so) as soon as all its weights have come,
so the worker holds at most one bucket and the layers it leaves incomplete. The trainer calls these over
vLLM's `collective_rpc` (in-process for the colocated engine, over HTTP for `aligner serve-rollouts`); the
trainer resets the prefix cache afterwards. vLLM imports this module in its worker, by name.
"""

from __future__ import annotations

import base64

from aligner.rollout.weights import Reassembly, unpack_bucket


class WeightReceiver:
    """Methods for vLLM's worker (`self` is the worker: `self.model_runner`, `self.vllm_config`)."""

    def _aligner_model(self):
        return self.model_runner.get_model()

    def aligner_begin_weights(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._aligner_model())
        self.aligner_weight_names = set()
        self.aligner_reassembly = Reassembly()  # tensors sent in runs of rows, until their last run

    def aligner_load_tensors(self, pairs) -> int:
        """Load (name, tensor) pairs; returns how many."""
        from vllm.config import set_current_vllm_config

        pairs = list(pairs)
        with set_current_vllm_config(self.vllm_config):
            self._aligner_model().load_weights(iter(pairs))
        self.aligner_weight_names.update(name for name, _ in pairs)
        return len(pairs)

    def aligner_load_bucket(self, meta: str, payload: str) -> int:
        """Load a packed bucket sent as text (its bytes base64-encoded; a tensor may come in runs of rows over
        several buckets, loaded once whole); returns how many tensors it completed."""
        return self.aligner_load_tensors(self.aligner_reassembly.add(unpack_bucket(meta, base64.b64decode(payload))))

    def aligner_end_weights(self) -> int:
        """Finish the reload; returns how many weights came since `aligner_begin_weights`."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        self.aligner_reassembly.check_done()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._aligner_model(), self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(self.model_runner, reset):  # what vLLM's own reload_weights resets
                getattr(self.model_runner, reset)()
        return len(self.aligner_weight_names)
