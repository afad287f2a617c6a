"""What llama.cpp itself allows on this machine: raw `llama_decode` steps, no server, for the serving targets.

A server can only lose speed on top of these. Measured on the default model, with every sequence 300 tokens deep
(the shared prompt of bench/serving.py), in one context with one KV stream per sequence, as scalpel serves:

- decode tok/s at batch 1, 4 and 8 (one token per sequence per step): the ceiling of "4 clients >= 2x 1";
- 8 sequences over the base and 2 adapters: 3 decodes per step (llama.cpp applies adapters per context, so a
  batch holds one adapter set), with the sets changed between them as any llama.cpp server must, and the same
  3 decodes under one unchanging set (the split alone, without llama.cpp's graph rebuild after a change).

    .venv/bin/python bench/decode_ceiling.py --threads 2 --adapter A.gguf --adapter B.gguf

Prints one JSON object. bench/serving.py runs it and puts it in its results.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import model_store  # noqa: E402

DEPTH = 300  # tokens already in each sequence's cache
SEQS = 8


class Decoder:
    """One context with SEQS sequences, each DEPTH tokens deep, stepped one token per sequence at a time."""

    def __init__(self, gguf: Path, adapters: list[str], threads: int):
        # kept referenced: llama.cpp calls it for as long as the process runs
        self._quiet = llama_cpp.llama_log_callback(lambda *_: None)
        llama_cpp.llama_log_set(self._quiet, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = SEQS * 2048, SEQS, False
        params.n_batch = params.n_ubatch = 512  # as serving/engine.py sets them
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.adapters = [llama_cpp.llama_adapter_lora_init(self.model, a.encode()) for a in adapters]
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.pos = [0] * SEQS
        for seq in range(SEQS):
            for _ in range(0, DEPTH, 100):
                self.decode([seq] * 100, logits=False)

    def use(self, adapter: int | None) -> None:
        """Apply no adapter (None) or adapter i, as a server does before a group's decode."""
        if adapter is None:
            llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
            return
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter])
        llama_cpp.llama_set_adapters_lora(self.ctx, handles, 1, (ctypes.c_float * 1)(1.0))

    def decode(self, seqs: list[int], *, logits: bool = True) -> None:
        """One llama_decode of the next token of each listed sequence (a sequence listed n times: n tokens)."""
        self.batch.n_tokens = len(seqs)
        for i, seq in enumerate(seqs):
            self.batch.token[i], self.batch.pos[i] = 100 + self.pos[seq] % 50, self.pos[seq]
            self.batch.n_seq_id[i], self.batch.logits[i] = 1, logits
            self.batch.seq_id[i][0] = seq
            self.pos[seq] += 1
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")


def tokens_per_second(step, tokens_per_step: int, steps: int = 10, repeats: int = 5) -> float:
    """Median over `repeats` of tokens per second across `steps` calls of `step`, after 3 warm-up calls."""
    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        begun = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(tokens_per_step * steps / (time.perf_counter() - begun))
    return round(statistics.median(rates), 1)


def measure(decoder: Decoder) -> dict:
    groups = [(None, [0, 1, 2]), (0, [3, 4, 5]), (1, [6, 7])]  # 8 sequences over the base and 2 adapters

    def switching() -> None:
        for adapter, seqs in groups:
            decoder.use(adapter)
            decoder.decode(seqs)

    def split_only() -> None:
        for _, seqs in groups:
            decoder.decode(seqs)

    decoder.use(None)
    result = {f"batch_{b}_tps": tokens_per_second(lambda b=b: decoder.decode(list(range(b))), b) for b in (1, 4, 8)}
    result["mixed_8_over_3_sets_tps"] = tokens_per_second(switching, SEQS)
    decoder.use(0)
    result["mixed_8_one_set_3_decodes_tps"] = tokens_per_second(split_only, SEQS)
    result["batch_4_over_batch_1"] = round(result["batch_4_tps"] / result["batch_1_tps"], 2)
    result["mixed_8_over_batch_4"] = round(result["mixed_8_over_3_sets_tps"] / result["batch_4_tps"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--adapter", action="append", required=True, help="a GGUF LoRA (give two)")
    args = parser.parse_args()
    if len(args.adapter) != 2:
        parser.error("give exactly two --adapter files")
    decoder = Decoder(model_store.ensure_default().gguf_path, args.adapter, args.threads)
    print(json.dumps(measure(decoder)))


if __name__ == "__main__":
    main()
