"""vLLM as a rollout server on devices of its own: `aligner serve-rollouts MODEL` starts vLLM's own
OpenAI-compatible server, and `VLLMServerEngine` (`rollout.engine: vllm_server`) samples from it and pushes
the policy's weights into it.

    aligner serve-rollouts runs/sft/final --port 8000            # e.g. CUDA_VISIBLE_DEVICES=1 on its own GPU
    aligner grpo --rollout.engine vllm_server --rollout.server_url http://localhost:8000

Sampling: prompts go as token ids to /v1/completions, completions come back as token ids with the sampled
tokens' log-probs (vLLM's processed log-probs, as with the colocated engine). Weight sync, after the policy
has moved: the weights stream under Hugging Face names (gathered from the shards under FSDP2), cut into
buckets of `rollout.sync_bucket_mb` (a tensor larger than that in runs of rows) and packed one at a time
into one fixed buffer (never the whole state dict), each bucket posted to the server's `/collective_rpc`,
which hands it to every worker's `WeightReceiver` (aligner/rollout/vllm_worker.py, vLLM's worker
extension); the prefix cache is reset after. Tensors go in the trainer's dtype (vLLM casts them).
Only the main process pushes; in a multi-process run the others wait for it (`OnlineTrainer.engine`).

The wire is HTTP (base64 text in JSON, what `/collective_rpc` accepts), which needs nothing but the URL: no
collective group between trainer and server, and the server can be on another machine. vLLM's dev endpoints
(`/collective_rpc`, `/reset_prefix_cache`) are on in the server this command starts: keep its port private.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request

import torch

from aligner.errors import ConfigError
from aligner.rollout.engine import Completion, Engine, SamplingParams, check_prompts
from aligner.rollout.vllm_engine import INSTALL_HINT, WORKER_EXTENSION
from aligner.rollout.weights import pack_bucket, wire_buckets


class VLLMServerEngine(Engine):
    """A client of a server started by `aligner serve-rollouts` at `url`. `sender`: whether this process
    pushes the weights (the main process of a run)."""

    def __init__(self, url: str, *, bucket_mb: float = 16, sender: bool = True, timeout: float = 3600):
        self.url = url.rstrip("/")
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.sender = sender
        self.timeout = timeout
        models = self._request("/v1/models", None, timeout=30)["data"]
        self.model_name = models[0]["id"]
        self.max_model_len = models[0].get("max_model_len")
        self.last_sync: dict | None = None  # {"buckets", "bytes", "seconds"} of the latest push

    def _request(self, path: str, body: dict | list[bytes] | None, timeout: float | None = None):
        """GET (no body) or POST a JSON body: a dict, or its encoding in parts (sent one after another)."""
        headers = {"Content-Type": "application/json"}
        if isinstance(body, list):
            headers["Content-Length"] = str(sum(len(part) for part in body))
            data = iter(body)
        else:
            data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read().decode(errors="replace").split())[:400]
            raise ConfigError(f"rollout server {self.url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(
                f"cannot reach the rollout server at {self.url} ({reason}): start one with "
                "`aligner serve-rollouts MODEL`, or set rollout.server_url"
            ) from None
        return json.loads(raw) if raw else None

    def _rpc(self, method: str, *args: str, payload: memoryview | None = None) -> list:
        """`method` on every worker of the server; `payload`: bytes to send base64-encoded as the last argument,
        written into the request body as they are (no further copies of the encoding)."""
        body = {"method": method, "args": list(args), "timeout": self.timeout}
        if payload is not None:  # {"method": ..., "timeout": ..., "args": [...args, "<base64>"]}
            head = f'{{"method": {json.dumps(method)}, "timeout": {json.dumps(self.timeout)}, "args": ['
            head += "".join(json.dumps(a) + ", " for a in args) + '"'
            body = [head.encode(), base64.b64encode(payload), b'"]}']
        out = self._request("/collective_rpc", body)
        return (out or {}).get("results", [])

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """len(prompts) * params.n completions, grouped per prompt (the n samples of prompt 0 first)."""
        check_prompts(prompts)
        if not prompts:
            return []
        body = {
            "model": self.model_name,
            "prompt": [list(map(int, p)) for p in prompts],
            "n": params.n,
            "temperature": params.temperature,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "top_p": params.top_p,
            "min_p": params.min_p,
            "max_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_ids),
            "ignore_eos": True,  # stop only on the caller's stop ids, as the other engines do
            "logprobs": 0,  # the sampled token's log-prob only
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "seed": params.seed,
        }
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) * params.n:
            raise ConfigError(f"rollout server {self.url}: {len(choices)} completions for {len(prompts)} x {params.n}")
        out = []
        for i, c in enumerate(choices):
            ids = [int(t) for t in c["token_ids"]]
            logps = [float(x) for x in (c.get("logprobs") or {}).get("token_logprobs", [])]
            out.append(Completion(list(prompts[i // params.n]), ids, logps, finished=c["finish_reason"] == "stop"))
        return out

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s weights (adapters merged) bucket by bucket; the prefix cache is reset after. A
        process that is not the sender only takes part in gathering sharded weights."""
        if not self.sender:
            if any(hasattr(p, "full_tensor") for p in model.parameters()):  # gathers run in step with the sender
                for _ in wire_buckets(model, self.bucket_bytes):
                    pass
            return
        start, sent, nbytes, count = time.perf_counter(), 0, 0, 0
        buffer = torch.empty(self.bucket_bytes, dtype=torch.uint8)
        self._rpc("aligner_begin_weights")
        buckets = wire_buckets(model, self.bucket_bytes)
        try:
            for bucket in buckets:
                meta, payload = pack_bucket(bucket, buffer)
                self._rpc("aligner_load_bucket", meta, payload=payload)
                sent, nbytes = sent + 1, nbytes + len(payload)
                count += sum(1 for _, t, first, rows in bucket if rows < 0 or first + t.shape[0] == rows)
        finally:
            buckets.close()
        loaded = self._rpc("aligner_end_weights")
        if any(int(n) != count for n in loaded):
            raise ConfigError(
                f"rollout server {self.url} took {loaded} of the policy's {count} weights: serve the policy's "
                "own model (aligner serve-rollouts <model.init_from>)"
            )
        self._request("/reset_prefix_cache", {})
        self.last_sync = {"buckets": sent, "bytes": nbytes, "seconds": time.perf_counter() - start}


def wait_for_server(url: str, process=None, timeout: float = 300) -> None:
    """Return once the server at `url` answers /health; raise if `process` (its Popen) exits first or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url.rstrip("/") + "/health", timeout=1)
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the rollout server stopped (exit code {process.returncode})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"the rollout server at {url} did not answer in {timeout:.0f} s") from None
            time.sleep(0.5)


def server_command(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    memory: float = 0.9,
    tensor_parallel: int = 1,
    max_model_len: int | None = None,
    cpu_kv_cache_gib: float = 1.0,
    extra: list[str] = (),
) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for `model`, with aligner's weight receiver as its
    worker extension (`extra`: more of vLLM's own flags). Run it with VLLM_SERVER_DEV_MODE=1 (`serve`)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(INSTALL_HINT)
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        hint = " (a LoRA adapter: serve its base model; the trainer pushes base + adapter merged)"
        adapter = os.path.isfile(os.path.join(model, "adapter_config.json"))
        raise ConfigError(f"'{model}' has no config.json{hint if adapter else ''}")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", host, "--port", str(port), "--dtype", dtype, "--gpu-memory-utilization", str(memory)]
    cmd += ["--tensor-parallel-size", str(tensor_parallel), "--worker-extension-cls", WORKER_EXTENSION]
    cmd += ["--enable-prefix-caching", "--logprobs-mode", "processed_logprobs"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if not torch.cuda.is_available():  # the CPU backend's own budget subtracts the process's memory (see vllm_engine)
        cmd += ["--kv-cache-memory-bytes", str(int(cpu_kv_cache_gib * 2**30)), "--enforce-eager"]
    return cmd + list(extra)


def serve(cmd: list[str]) -> None:
    """Replace this process with the server `cmd` (`server_command`), vLLM's dev endpoints on for weight sync."""
    print(f"serve-rollouts: {' '.join(cmd[1:])}", flush=True)
    os.execve(sys.executable, cmd, dict(os.environ, VLLM_SERVER_DEV_MODE="1"))
