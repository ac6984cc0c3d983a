#!/usr/bin/env python3
"""transformers on the same geometry as `med-rlvr bench`, printing the same JSON.

    python benches/torch_reference.py --config assets/configs/qwen2.5-0.5b.json --batch 8 \
        --prompt-len 64 --new-tokens 32 --threads 2 [--rollout --n 4] [--dtype float32|bfloat16] [--device cpu|cuda]

Kernel mode: one prefill of batch x prompt-len random tokens with the cache, then new-tokens greedy
single-token decode steps reusing past_key_values (logits of each step moved to the host, like the
Rust bench). Rollout mode: model.generate(do_sample=True, temperature=1) of exactly new-tokens tokens
for batch prompts x n samples.
"""
import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--random-weights", action="store_true", default=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rollout", action="store_true")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config.from_dict(json.load(open(a.config)))
    dtype = getattr(torch, a.dtype)
    model = Qwen2ForCausalLM(cfg).to(dtype=dtype, device=a.device).eval()
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt_len), generator=g).to(a.device)
    sync = (lambda: torch.cuda.synchronize()) if a.device == "cuda" else (lambda: None)
    with torch.inference_mode():
        if a.rollout:
            model.generate(ids[:1], max_new_tokens=2, do_sample=True, pad_token_id=0)
            sync()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=a.n, pad_token_id=0)
            sync()
            s = time.perf_counter() - t0
            gen = (out.shape[1] - a.prompt_len) * out.shape[0]
            res = dict(prompts=a.batch, n=a.n, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                       generated_tokens=gen, seconds=s, generated_tok_s=gen / s)
        else:
            model(ids[:, :8], use_cache=True)  # warm-up
            sync()
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            logits = out.logits[:, -1].float().cpu()
            sync()
            prefill = time.perf_counter() - t0
            past = out.past_key_values
            t0 = time.perf_counter()
            for step in range(a.new_tokens):
                nxt = logits.argmax(-1, keepdim=True).to(a.device)
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1].float().cpu()
            sync()
            decode = time.perf_counter() - t0
            bytes_per = nparams * torch.finfo(dtype).bits / 8
            res = dict(batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                       prefill_tok_s=a.batch * a.prompt_len / prefill, decode_tok_s=a.batch * a.new_tokens / decode,
                       decode_weight_bytes_per_s=bytes_per * a.new_tokens / decode)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
