#!/usr/bin/env python3
"""One full PPO step of `med-rlvr train` on a model geometry with random weights, timed by phase,
with transformers' forward + backward of one micro-batch on the same device as the reference.

    python3 benches/ppo_step.py --bin target/release/med-rlvr --geometry assets/configs/qwen2.5-3b.json \
        --preset assets/presets/med-rlvr-qwen2.5-3b.toml --prompts 64 --new-tokens 512 --device cuda

1. Writes a random model of the geometry (transformers `Qwen2ForCausalLM`, std 0.02, saved in
   bf16 on cuda and f32 on cpu) with the demo tokenizer into --workdir (ids the tokenizer does not
   know decode to nothing: every reply fails the format, which does not change the step's work).
2. Runs `med-rlvr train` for one step on the demo prompts with the preset's recipe, the given
   prompt count and response length (no EOS stop: every response is --new-tokens long), sampling
   GPU memory with nvidia-smi every 0.2 s; reads `phase_seconds` from metrics.jsonl.
3. transformers: forward + backward of one micro-batch (1 x prompt+new tokens, the update's unit)
   with LoRA-free full gradients on the same weights and dtype, best of 3, and peak memory.
Prints one JSON object; paste it into benches/RESULTS.md with the command line.
"""
import argparse
import json
import os
import shutil
import subprocess
import threading
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_model(geometry, out, dtype):
    config = Qwen2Config(**{k: v for k, v in json.load(open(geometry)).items() if k != "architectures"})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(os.path.join(ROOT, "assets/demo/model/tokenizer.json"), out)
    return model


class GpuMemory:
    """Peak `memory.used` of GPU 0 (MiB) while the block runs, by polling nvidia-smi."""

    def __init__(self, enabled):
        self.enabled, self.peak, self.stop = enabled, 0, False

    def poll(self):
        while not self.stop:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True, text=True,
            ).stdout.strip()
            if out:
                self.peak = max(self.peak, int(out.splitlines()[0]))
            time.sleep(0.2)

    def __enter__(self):
        if self.enabled:
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        if self.enabled:
            self.thread.join()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--geometry", required=True)
    ap.add_argument("--preset", default=os.path.join(ROOT, "assets/presets/med-rlvr-qwen2.5-3b.toml"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default="/tmp/med-rlvr-ppo-step")
    ap.add_argument("--set", action="append", default=[], help="extra `train --set` overrides")
    a = ap.parse_args()

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model_dir = os.path.join(a.workdir, "model")
    run_dir = os.path.join(a.workdir, "run")
    shutil.rmtree(a.workdir, ignore_errors=True)
    t = time.time()
    model = write_model(a.geometry, model_dir, dtype)
    write_s = time.time() - t

    sets = [
        "train.steps=1", "train.eval_every=0", "train.save_every=0", "data.eval_limit=0",
        'data.format="generic"', f'data.eval="{os.path.join(ROOT, "assets/demo/test.jsonl")}"',
        f"rollout.prompts_per_step={a.prompts}",
        f"rollout.max_new_tokens={a.new_tokens}", "rollout.stop=[]",
    ] + a.set
    cmd = [a.bin, "train", "--config", a.preset, "--model", model_dir,
           "--data", os.path.join(ROOT, "assets/demo/train.jsonl"), "--out", run_dir, "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    with GpuMemory(a.device == "cuda") as mem:
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(f"med-rlvr failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    m = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).readline())

    # transformers: forward + backward of one micro-batch of the update.
    model = model.to(a.device).train()
    prompt_len = 200
    seq = prompt_len + a.new_tokens
    ids = torch.randint(0, 800, (1, seq), device=a.device)
    times = []
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        logits = model(ids).logits.float()
        logp = torch.log_softmax(logits[:, prompt_len - 1:-1], -1).gather(-1, ids[:, prompt_len:, None])
        logp.mean().backward()
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t)
    print(json.dumps({
        "geometry": a.geometry, "device": a.device, "prompts": a.prompts, "new_tokens": a.new_tokens,
        "write_random_model_s": round(write_s, 1),
        "med_rlvr": {
            "process_wall_s": round(wall, 2), "step_s": m["seconds"], "phase_seconds": m["phase_seconds"],
            "generated_tokens": m["response_len_mean"] * a.prompts, "decode_tokens_per_s": m["tokens_per_s"],
            "peak_gpu_mib": mem.peak if a.device == "cuda" else None,
        },
        "transformers_microbatch_fwd_bwd": {
            "tokens": seq, "dtype": str(dtype), "best_s": round(min(times), 4),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() // 2**20 if a.device == "cuda" else None,
        },
    }, indent=1))


if __name__ == "__main__":
    main()
