#!/usr/bin/env python
"""GPU / DeepSpeed ZeRO-Inference checks on one CUDA machine (no data mirror, no downloads).

    python bench/gpu_check.py --tokenizer DIR [--out results.json]

DIR holds a Hugging Face tokenizer (tokenizer.json etc.; e.g. the embedded model's converted cache
~/.cache/icl_scale/smollm2-135m). Random OPT and Llama (GQA) models are built on the GPU and
synthetic multiple-choice requests are scored. Checks:

1. gates on CUDA: all-ones gates bit-identical; d loss/d gate == sum_t <o, dL/do> (fp32);
2. prefix-cached scorer == naive scorer on CUDA (fp32, and bf16 within bf16 rounding);
3. gradient importance on CUDA == on CPU for the same weights (fp32);
4. DeepSpeed ZeRO-3 (world size 1; params partitioned, and offloaded to CPU): importance and scores
   equal plain CUDA;
5. throughput: forward tokens/s and importance-pass / forward time on an OPT-1.3B-shaped model (bf16).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.importance import gradient_importance  # noqa: E402
from icl_scale.models import Gates  # noqa: E402
from icl_scale.models.adapters import Adapter  # noqa: E402
from icl_scale.models.loading import LoadedModel, random_config  # noqa: E402
from icl_scale.scoring import score_naive, score_requests  # noqa: E402
from icl_scale.tasks.base import Request  # noqa: E402


def make_lm(family, tok, device, dtype, **cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    c = random_config(family, len(tok), **cfg)
    c._attn_implementation = "sdpa"
    with torch.device(device):  # initialise on the GPU (fast for big random models)
        m = AutoModelForCausalLM.from_config(c, dtype=dtype).eval()
    m.requires_grad_(False)
    return LoadedModel(name=f"rand-{family}", model=m, tokenizer=tok, adapter=Adapter(m), doc_start_ids=[],
                       max_length=512, device=torch.device(device), dtype=dtype)


def requests(n=24, seed=0):
    rnd = random.Random(seed)
    words = ("the a cat dog sat on mat under tree house big small red blue went quickly slowly river "
             "stone bright cold warm ran jumped over because therefore question answer").split()

    def s(k):
        return " ".join(rnd.choice(words) for _ in range(k))

    out = []
    for i in range(n):
        k = rnd.choice([2, 3, 4])
        out.append(Request(doc_id=i, contexts=[s(rnd.randint(5, 120))],
                           continuations=[" " + s(rnd.randint(1, 8)) for _ in range(k)], gold=rnd.randrange(k)))
    out.append(Request(doc_id=n, contexts=["x " + s(9), "y " + s(12)], continuations=[" " + s(5)], gold=0))
    out.append(Request(doc_id=n + 1, contexts=[s(40)], continuations=[" yes", " no"], gold=1))
    return out


def max_diff(a, b):
    return max(abs(x.logprob - y.logprob) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip-zero", action="store_true")
    ap.add_argument("--only-throughput", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    assert torch.cuda.is_available(), "no CUDA device"
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    reqs = requests()
    small = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=512)

    # 1-3: plain CUDA, fp32, OPT and Llama (GQA)
    families = (("opt", dict(ffn_dim=1024, word_embed_proj_dim=256)),
                ("llama", dict(num_key_value_heads=2, intermediate_size=1024)))
    for fam, extra in families if not args.only_throughput else ():
        lm = make_lm(fam, tok, "cuda", torch.float32, **small, **extra)
        g = lm.adapter.geometry
        ids = torch.randint(100, 5000, (2, 32), device="cuda")
        with torch.no_grad():
            ref = lm.model(input_ids=ids).logits
            with Gates(lm.adapter, head_mask=torch.ones(g.n_layers, g.n_heads), ffn_mask=torch.ones(g.n_layers)):
                same = torch.equal(lm.model(input_ids=ids).logits, ref)
        hm = torch.ones(g.n_layers, g.n_heads, device="cuda", requires_grad=True)
        with Gates(lm.adapter, head_mask=hm):
            loss = lm.model(input_ids=ids, labels=ids).loss
            (dh,) = torch.autograd.grad(loss, [hm])
        with Gates(lm.adapter, record=True) as gates:
            loss = lm.model(input_ids=ids, labels=ids).loss
            ph, _ = gates.probe_grads(loss, tuple(ids.shape))
        naive = score_naive(lm, reqs, batch_size=4)
        cached = score_requests(lm, reqs, batch_size=8)
        imp_gpu = gradient_importance(lm, reqs, batch_size=4).result()
        lm_cpu = copy.deepcopy(lm)
        lm_cpu.model.to("cpu")
        lm_cpu.device = torch.device("cpu")
        lm_cpu.adapter = Adapter(lm_cpu.model)
        imp_cpu = gradient_importance(lm_cpu, reqs, batch_size=4).result()
        bf = copy.deepcopy(lm)
        bf.model.to(torch.bfloat16)
        bf.dtype = torch.bfloat16
        bf.adapter = Adapter(bf.model)
        cached_bf = score_requests(bf, reqs, batch_size=8)
        naive_bf = score_naive(bf, reqs, batch_size=4)
        res[fam] = {
            "all_ones_gates_bit_identical": same,
            "gate_grad_vs_token_sum_rel": rel(ph.sum(dim=(1, 2)), dh),
            "cached_vs_naive_fp32_max_nats": max_diff(cached, naive),
            "cached_vs_naive_bf16_max_nats": max_diff(cached_bf, naive_bf),
            "bf16_vs_fp32_max_nats": max_diff(cached_bf, naive),
            "importance_gpu_vs_cpu_rel_heads": rel(imp_gpu["heads"], imp_cpu["heads"]),
            "importance_gpu_vs_cpu_rel_ffn": rel(imp_gpu["ffn"], imp_cpu["ffn"]),
        }
        print(fam, json.dumps(res[fam]), flush=True)

        # 4: DeepSpeed ZeRO-3 on the same weights
        if not args.skip_zero:
            from icl_scale.models.loading import partition_zero3

            for offload in ("none", "cpu"):
                try:
                    z = copy.deepcopy(lm)
                    z.model.to("cpu")
                    partition_zero3(z, offload)
                    z.device = torch.device("cuda")
                    imp_z = gradient_importance(z, reqs, batch_size=4).result()
                    sc_z = score_requests(z, reqs, batch_size=8)
                    res[fam][f"zero3_{offload}"] = {
                        "importance_rel_heads": rel(imp_z["heads"], imp_gpu["heads"]),
                        "importance_rel_ffn": rel(imp_z["ffn"], imp_gpu["ffn"]),
                        "scores_max_nats": max_diff(sc_z, cached),
                        "params_partitioned": all(p.numel() == 0 or hasattr(p, "ds_id") for p in z.model.parameters()),
                    }
                except Exception as e:  # report, keep going
                    res[fam][f"zero3_{offload}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(fam, "zero3", offload, json.dumps(res[fam][f"zero3_{offload}"]), flush=True)

    # 5: throughput on an OPT-1.3B-shaped model in bf16
    big = make_lm("opt", tok, "cuda", torch.bfloat16, hidden_size=2048, num_hidden_layers=24,
                  num_attention_heads=32, ffn_dim=8192, word_embed_proj_dim=2048, max_position_embeddings=2048)
    big.max_length = 2048
    long_reqs = requests(64, seed=1)
    n_tok = sum(len(tok(r.contexts[0])["input_ids"]) for r in long_reqs)
    for _ in range(2):  # warm-up
        score_requests(big, long_reqs[:8], batch_size=16)
    torch.cuda.synchronize()
    t = time.time()
    score_requests(big, long_reqs, batch_size=16)
    torch.cuda.synchronize()
    t_score = time.time() - t
    from icl_scale.importance import importance_inputs
    from icl_scale.scoring import pad_right

    ex = importance_inputs(big, long_reqs)
    t = time.time()
    with torch.no_grad():
        for s in range(0, len(ex), 8):
            ids, mask = pad_right([e[0] for e in ex[s:s + 8]], tok.pad_token_id)
            big.model(input_ids=ids.cuda(), attention_mask=mask.cuda())
    torch.cuda.synchronize()
    t_fwd = time.time() - t
    gradient_importance(big, long_reqs[:16], batch_size=8)  # warm-up (backward kernels)
    torch.cuda.synchronize()
    t = time.time()
    gradient_importance(big, long_reqs, batch_size=8)
    torch.cuda.synchronize()
    t_imp = time.time() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        gradient_importance(big, long_reqs[:16], batch_size=8)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8), flush=True)
    res["throughput_opt1.3b_shape_bf16"] = {
        "docs": len(long_reqs), "context_tokens": n_tok, "score_docs_per_s": len(long_reqs) / t_score,
        "forward_s": t_fwd, "importance_s": t_imp, "importance_over_forward": t_imp / t_fwd,
    }
    print(json.dumps(res["throughput_opt1.3b_shape_bf16"]), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
