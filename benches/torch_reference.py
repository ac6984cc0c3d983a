#!/usr/bin/env python3
"""transformers on the same geometry as `med-rlvr bench`, printing the same JSON.

    python benches/torch_reference.py --config assets/configs/qwen2.5-0.5b.json --batch 8 \
        --prompt-len 64 --new-tokens 32 --threads 2 [--rollout --n 4] [--dtype float32|bfloat16] [--device cpu|cuda]

Kernel mode: one prefill of batch x prompt-len random tokens with the cache, then new-tokens greedy
single-token decode steps reusing past_key_values (logits of each step moved to the host, like the
Rust bench). Rollout mode: model.generate(do_sample=True, temperature=1) of exactly new-tokens tokens
for batch prompts x n samples. Products mode (--products [--passes P]): each weight-reading product
of one decode step at batch rows timed alone, as `med-rlvr bench --products`: F.linear with the
weight in PyTorch's [out, in] layout (the tied head: E [vocab, hidden] times h^T), distinct copies
cycled through (1 GiB together, 2-4,096 copies) so the weight comes from memory.
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
    ap.add_argument("--products", action="store_true")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config.from_dict(json.load(open(a.config)))
    if a.products:
        print(json.dumps(products(cfg, a)))
        return
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


def products(cfg, a):
    """Each weight-reading product of one decode step, alone: weight GB/s, as the Rust bench."""
    dtype = getattr(torch, a.dtype)
    h, i = cfg.hidden_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = [("q_proj", a.batch, h, q), ("k_proj", a.batch, h, kv), ("v_proj", a.batch, h, kv),
              ("o_proj", a.batch, q, h), ("gate_proj", a.batch, h, i), ("up_proj", a.batch, h, i),
              ("down_proj", a.batch, i, h), ("tied_head", cfg.vocab_size, h, a.batch)]
    out = []
    with torch.inference_mode():
        for name, m, k, n in shapes:
            head = name == "tied_head"
            elems = m * k if head else k * n
            copies = min(max((1 << 30) // (elems * torch.finfo(dtype).bits // 8), 2), 4096)
            # F.linear(x, W) = x W^T with W [out, in]: the head's E [vocab, hidden] is its weight.
            ws = [torch.empty(m if head else n, k, dtype=dtype, device=a.device).uniform_(-0.05, 0.05)
                  for _ in range(copies)]
            x = torch.empty(n if head else m, k, dtype=dtype, device=a.device).uniform_(-0.05, 0.05)

            def one_pass():
                for w in ws:
                    y = torch.nn.functional.linear(x, w)
                return y.cpu()

            one_pass()
            t0 = time.perf_counter()
            for _ in range(a.passes):
                one_pass()
            s = (time.perf_counter() - t0) / (a.passes * copies)
            out.append(dict(name=name, m=m, k=k, n=n, microseconds=s * 1e6,
                            weight_gb_s=elems * torch.finfo(dtype).bits / 8 / s / 1e9))
            del ws
    return dict(batch=a.batch, main_thread="torch", products=out)


if __name__ == "__main__":
    main()
