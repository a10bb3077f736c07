"""Generation latency at batch 1 and batched forward throughput.

Generation: greedy decoding from a fixed prompt of ``prompt_tokens`` tokens for exactly
``new_tokens`` tokens (EOS cannot stop it early), after ``warmup`` untimed runs; each of ``runs``
timed runs records when each token comes out (a streamer), and the median over runs is reported:

- time to first token (ms): from the call to the first new token (prefill + one step);
- ms per output token: the decode steps after the first, per token;
- tokens/s: new tokens over the whole call.

Throughput: forward passes over a ``[batch_size, seq_len]`` batch, tokens/s, median over runs.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lit_recover.evaluation.report import OK, measurement

log = logging.getLogger(__name__)

_PROMPT_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request. The quick brown fox jumps over the lazy dog while the model answers questions about the "
    "capital of France, the sum of numbers in a list and three tips for staying healthy. "
)


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def fixed_prompt_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """A ``[1, n_tokens]`` prompt: a fixed English text (with the tokenizer's BOS), repeated to length."""
    text = _PROMPT_TEXT
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    while ids.numel() < n_tokens:
        text += _PROMPT_TEXT
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids[:n_tokens].unsqueeze(0)


class _TokenClock:
    """A generation streamer that notes when each step's tokens come out (the first call is the prompt)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.times: list[float] = []

    def put(self, value) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def generation_latency(model: nn.Module, tokenizer, prompt_tokens: int = 32, new_tokens: int = 32,
                       runs: int = 3, warmup: int = 1, progress: bool = True) -> dict:
    """Median time to first token, ms per output token and tokens/s of greedy generation at batch 1."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}")
    device = model.get_input_embeddings().weight.device
    sync = _sync_for(device)
    ids = fixed_prompt_ids(tokenizer, prompt_tokens).to(device)
    mask = torch.ones_like(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Our own config: the model's may sample, or stop early at EOS, which would change what is timed.
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    ttft, per_token, tps = [], [], []
    for i in tqdm(range(warmup + runs), desc="latency", unit="run", disable=not progress, leave=False):
        clock = _TokenClock(sync)
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, streamer=clock)
        sync()
        t1 = time.perf_counter()
        produced = out.shape[1] - ids.shape[1]
        steps = clock.times[1:]  # the first put is the prompt itself
        if produced != new_tokens or len(steps) != new_tokens:
            raise RuntimeError(f"generation made {produced} tokens ({len(steps)} timed), expected {new_tokens}")
        if i < warmup:
            continue
        ttft.append((steps[0] - t0) * 1e3)
        per_token.append((steps[-1] - steps[0]) * 1e3 / (new_tokens - 1))
        tps.append(new_tokens / (t1 - t0))
    return {
        "time_to_first_token": measurement(statistics.median(ttft), "ms", higher_is_better=False, runs=ttft),
        "ms_per_token": measurement(statistics.median(per_token), "ms", higher_is_better=False, runs=per_token),
        "tokens_per_second": measurement(statistics.median(tps), "tokens/s", higher_is_better=True, runs=tps),
    }


@torch.no_grad()
def forward_throughput(model: nn.Module, tokenizer, batch_size: int = 4, seq_len: int = 128, runs: int = 3,
                       warmup: int = 1, progress: bool = True) -> dict:
    """Median tokens/s of full forward passes over a ``[batch_size, seq_len]`` batch."""
    from tqdm.auto import tqdm

    device = model.get_input_embeddings().weight.device
    sync = _sync_for(device)
    batch = fixed_prompt_ids(tokenizer, seq_len).repeat(batch_size, 1).to(device)
    times = []
    for i in tqdm(range(warmup + runs), desc="throughput", unit="run", disable=not progress, leave=False):
        sync()
        t0 = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    rates = [batch.numel() / t for t in times]
    return {"forward_tokens_per_second": measurement(statistics.median(rates), "tokens/s", higher_is_better=True,
                                                     runs=rates)}


def evaluate_latency(model: nn.Module, tokenizer, prompt_tokens: int = 32, new_tokens: int = 32, runs: int = 3,
                     warmup: int = 1, throughput_batch_size: int = 4, throughput_seq_len: int = 128,
                     progress: bool = True) -> dict:
    """The ``latency`` section: generation latency and forward throughput, with device, dtype and threads.

    Args:
        model: the model, in eval mode, on the device to time.
        tokenizer: its tokenizer.
        prompt_tokens: prompt length for generation.
        new_tokens: tokens generated per run.
        runs: timed runs (the median is reported).
        warmup: untimed runs first.
        throughput_batch_size: sequences per forward pass for throughput.
        throughput_seq_len: tokens per sequence for throughput.
        progress: progress bars.
    """
    t0 = time.perf_counter()
    if runs < 1:
        raise ValueError(f"latency runs must be at least 1, got {runs}")
    weight = model.get_input_embeddings().weight
    out: dict = {"status": OK, "settings": {
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
        "decoding": "greedy, batch 1, KV cache", "throughput_batch_size": throughput_batch_size,
        "throughput_seq_len": throughput_seq_len, "device": str(weight.device),
        "dtype": str(weight.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(weight.device) if weight.device.type == "cuda" else None,
    }}
    out.update(generation_latency(model, tokenizer, prompt_tokens, new_tokens, runs, warmup, progress))
    out.update(forward_throughput(model, tokenizer, throughput_batch_size, throughput_seq_len, runs, warmup,
                                  progress))
    log.info("latency: first token %.1f ms, %.2f ms/token, %.1f tokens/s", out["time_to_first_token"]["value"],
             out["ms_per_token"]["value"], out["tokens_per_second"]["value"])
    out["elapsed"] = measurement(time.perf_counter() - t0, "s")
    return out
