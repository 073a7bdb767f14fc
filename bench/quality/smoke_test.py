#!/usr/bin/env python3
"""CPU smoke test of the quality harness, run by ctest: a tiny random Llama checkpoint and a small
synthetic corpus go through every protocol, every policy and both quantizers via the real codec
(libspectrumkv_codec.so from $SPECTRUMKV_CODEC_LIB), then the results are checked for the
invariants that must hold whatever the model: the codec at budget 1.0 is the identity, realized
budgets never exceed the requested ones, the prefill cache reproduces a single forward pass,
masked (dropped) positions are invisible to attention, and the probe writes its policy. A tiny
character-level model checks the reference model's tokenizer and needle layout the same way.

Works with Debian's python3-torch 1.13 and no transformers (the built-in Llama is used). Exits
77 (ctest: skipped) only if torch or numpy cannot be imported.
"""

import json
import os
import random
import sys
import tempfile

try:
    import numpy as np
    import torch
except ImportError as e:  # pragma: no cover - the environment decides
    print(f"SKIPPED: the quality harness needs PyTorch and numpy ({e}); "
          "install python3-torch (scripts/setup.sh does)")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import data  # noqa: E402
import harness  # noqa: E402
import spectrumkv_probe  # noqa: E402
import tiny_llama  # noqa: E402
from modeling import LanguageModel  # noqa: E402

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print(f"FAIL: {what}", flush=True)


def make_corpus(directory):
    """A small WikiText-like test.txt (fixed seed) and its word list."""
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(180)] + ["the", ".", ","]
    lines = []
    for _ in range(120):
        lines.append(" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 30))) + " ")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "test.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return vocab


def make_model(directory, words):
    torch.manual_seed(0)
    key_words = " ".join(k for k, _ in data.NEEDLE_KEYS).split() + ["what", "?"]
    tok = data.WordTokenizer.build(words, extra=key_words + data.DIGITS)
    config = tiny_llama.Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, rope_theta=1e4, max_position_embeddings=512)
    model = tiny_llama.TinyLlama(config)
    model.init_weights(std=0.2)  # large enough that KV errors move the logits
    tiny_llama.save_checkpoint(model, directory, dtype=torch.float32, max_shard_bytes=100_000)
    tok.save(directory)
    with open(os.path.join(directory, "niah_pool.json"), "w") as f:
        json.dump([w for w in words if w.startswith("w")][:50], f)


def check_char_level(tmp, data_dir):
    """The character-level tokenizer (the reference model's): tokenizer.json round trip, NIAH
    prompts laid out on word boundaries with the answer where answer_pos says, and the harness's
    PPL and NIAH protocols on a tiny random character model."""
    text = data.wikitext_text(os.path.join(data_dir, "test.txt"))
    tok = data.CharTokenizer.build(text, extra=" ".join(k for k, _ in data.NEEDLE_KEYS) +
                                   " what ? . 0123456789\n")
    model_dir = os.path.join(tmp, "char_model")
    tok.save(model_dir)
    back = data.load_tokenizer(model_dir)
    check(back.level == "char" and back.itos == tok.itos, "char tokenizer.json round trip")
    check(back.decode(back.encode(text)) == text, "char tokenizer does not round-trip test.txt")
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    check(spec["pre_tokenizer"]["type"] == "Split" and spec["decoder"]["type"] == "Fuse",
          "char tokenizer.json layout")
    ids = tok.encode(text)
    trials = data.niah_trials(tok.encode, ids, 300, [0.2, 0.5, 0.8], [0, 1], ["w1", "w2"], 5,
                              "char")
    for t in trials:
        prompt = tok.decode(t.prompt_ids)
        check(len(t.prompt_ids) == 300, "char NIAH prompt length")
        check(tok.decode(t.prompt_ids[t.answer_pos:t.answer_pos + len(t.answer_text)])
              == t.answer_text, "char NIAH answer_pos")
        segment = data.needle_segment(data.NEEDLE_KEYS[t.needle][0], t.answer_text.split(),
                                      "char")
        check(prompt[t.needle_pos:].startswith(segment) and
              prompt[t.needle_pos + len(segment)] == " ", "char needle not between words")
        check(prompt.endswith(data.question_text(data.NEEDLE_KEYS[t.needle][0], "char")),
              "char NIAH question")
    torch.manual_seed(1)
    config = tiny_llama.Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, rope_theta=1e4, max_position_embeddings=512)
    model = tiny_llama.TinyLlama(config)
    model.init_weights(std=0.2)
    tiny_llama.save_checkpoint(model, model_dir, dtype=torch.float32)
    with open(os.path.join(model_dir, "niah_pool.json"), "w") as f:
        json.dump(["w1", "w2", "w3"], f)
    r = harness.main([
        "--model", model_dir, "--device", "cpu", "--dtype", "bf16", "--backend", "builtin",
        "--data-dir", data_dir, "--out", os.path.join(tmp, "char.json"), "--seq-len", "160",
        "--cont-len", "32", "--windows", "2", "--budgets", "0.5", "--budget-kinds", "element",
        "--policies", "pdtrim,3tier", "--scorings", "attention", "--quantizers", "absmax",
        "--niah-context", "200", "--niah-depths", "2", "--niah-needles", "1", "--window", "8",
        "--threads", "2"])
    full = r["ppl"]["full"]
    check(full.get("token_level") == "char" and full["chars_per_word"] > 1,
          "char PPL without its word-level equivalent")
    check(r["ppl"]["codec_identity_max_logit_diff"] == 0.0, "char model: codec identity")
    check(r["niah"][0]["trials"] == 2, "char NIAH trials")


def check_model_plumbing(model_dir):
    """Prefill + cache continuation == one forward pass; masked positions are invisible."""
    lm = LanguageModel(model_dir, "cpu", "bf16", "builtin")
    ref = tiny_llama.load_checkpoint(model_dir, dtype=torch.float32)
    lm32 = LanguageModel(model_dir, "cpu", "bf16", "builtin")
    lm32.model, lm32.dtype = ref, torch.float32
    ids = list(range(3, 43))
    pre = lm32.prefill(ids[:30], window=4)
    check(tuple(pre.kv.shape) == (2, 2, 30, 2, 16), f"prefill kv shape {tuple(pre.kv.shape)}")
    check(tuple(pre.queries.shape) == (2, 4, 4, 16), f"queries shape {tuple(pre.queries.shape)}")
    cont = torch.tensor([ids[30:]])
    keep = torch.ones(1, 30, dtype=torch.bool)
    logits, _ = lm32.forward_with_cache(pre.kv[None], keep, cont, 30)
    full, _, _ = ref(torch.tensor([ids]))
    diff = (logits[0] - full[0, 30:].float()).abs().max().item()
    check(diff < 1e-4, f"cache continuation differs from one forward pass by {diff}")
    # Post-RoPE queries: the captured last query against the cached keys reproduces the last
    # position's attention logits of layer 0 (checked through the softmax-weighted values).
    q = pre.queries[0, -1]  # [Hq, D]
    k, v = pre.kv[0, 0], pre.kv[0, 1]  # [n, H, D]
    group = q.shape[0] // k.shape[1]
    att = torch.softmax(torch.einsum("hd,nhd->hn", q, k.repeat_interleave(group, 1)) / 4.0, -1)
    out = torch.einsum("hn,nhd->hd", att, v.repeat_interleave(group, 1)).reshape(1, -1)
    layer0 = ref.model.layers[0]
    x = ref.model.embed_tokens(torch.tensor([ids[:30]]))
    h_ref, _, _ = layer0.self_attn(layer0.input_layernorm(x), *tiny_llama.rope_cos_sin(
        ref.config, torch.arange(30)[None], x.dtype), None, None, True, 0, 0.0)
    got = layer0.self_attn.o_proj(out)
    check((got - h_ref[0, -1]).abs().max().item() < 1e-4, "captured queries are not post-RoPE")
    # Masking: garbage in masked positions must not change anything.
    keep2 = keep.clone()
    keep2[0, 5:12] = False
    garbage = pre.kv.clone()
    garbage[:, :, 5:12] = 100.0
    a, _ = lm32.forward_with_cache(pre.kv[None], keep2, cont, 30)
    b, _ = lm32.forward_with_cache(garbage[None], keep2, cont, 30)
    check(torch.equal(a, b), "masked positions leak into attention")
    check(not torch.equal(a, logits), "masking positions changed nothing (test cannot fail)")
    return lm


def main():
    if not os.environ.get("SPECTRUMKV_CODEC_LIB"):
        default = os.path.join(HERE, "..", "..", "build", "lib", "libspectrumkv_codec.so")
        os.environ["SPECTRUMKV_CODEC_LIB"] = default
    print(f"torch {torch.__version__}, codec {os.environ['SPECTRUMKV_CODEC_LIB']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        model_dir = os.path.join(tmp, "model")
        words = make_corpus(data_dir)
        make_model(model_dir, words)
        check(os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")),
              "sharded checkpoint not written")
        check_model_plumbing(model_dir)
        check_char_level(tmp, data_dir)

        out = os.path.join(tmp, "results.json")
        r = harness.main([
            "--model", model_dir, "--device", "cpu", "--dtype", "bf16", "--backend", "builtin",
            "--data-dir", data_dir, "--out", out, "--seq-len", "192", "--cont-len", "32",
            "--windows", "2", "--budgets", "0.3,0.5", "--niah-context", "96",
            "--niah-depths", "2", "--niah-needles", "2", "--niah-budgets", "0.3",
            "--window", "8", "--threads", "2", "--batch", "16"])
        with open(out) as f:
            check(json.load(f)["ppl"]["windows"] == 2, "results JSON not written")
        ppl = r["ppl"]
        check(ppl["codec_identity_max_logit_diff"] == 0.0,
              f"codec at budget 1.0 is not the identity ({ppl['codec_identity_max_logit_diff']})")
        check(np.isfinite(ppl["full"]["ppl"]), "full-precision PPL is not finite")
        policies = {m["policy"] for m in ppl["methods"]}
        check(policies == set(harness.ALL_POLICIES), f"policies run: {sorted(policies)}")
        check(len(ppl["methods"]) == len(harness.method_grid(
            harness.ALL_POLICIES, [0.3, 0.5], ["wire", "element"],
            ["attention", "key_norm", "positional"], ["absmax", "kcn"])), "method count")
        for m in ppl["methods"]:
            label = m["label"]
            if m["policy"].startswith("uniform"):
                want = 0.5 if m["policy"] == "uniform_int8" else 0.25
                check(abs(m["element_budget"] - want) < 1e-12, f"{label} element budget")
            elif m["budget_kind"] == "element":
                check(m["element_budget"] <= m["budget"] + 1e-9, f"{label} over element budget")
            else:
                check(m["wire_budget"] <= m["budget"] + 1e-9, f"{label} over wire budget")
            check(abs(sum(m["tier_fractions"]) - 1) < 1e-3, f"{label} tier fractions")
            check(m["kl"] > -1e-6 and np.isfinite(m["ppl"]), f"{label} KL/PPL")
            if m["policy"] == "pdtrim":
                check(m["tier_fractions"][3] > 0.4, f"{label} drops nothing")
        int4 = [m for m in ppl["methods"] if m["policy"] == "uniform_int4"]
        check(all(m["kl"] > 0 for m in int4), "uniform INT4 leaves the model exactly unchanged")
        niah = r["niah"][0]
        check(niah["trials"] == 4 and niah["context"] == 96, "NIAH trials")
        check(all(m["trials"] == 4 for m in niah["methods"]), "NIAH methods ran every trial")

        policy = os.path.join(tmp, "policy.yaml")
        status = spectrumkv_probe.main([
            "--model", model_dir, "--device", "cpu", "--dtype", "bf16", "--backend", "builtin",
            "--data-dir", data_dir, "--context", "96", "--quantizers", "absmax,kcn",
            "--out", policy, "--window", "8", "--threads", "2"])
        with open(policy) as f:
            text = f.read()
        check("int4_allowed:" in text and "allowed_tiers:" in text, "policy YAML content")
        fp = int(text.split("full_precision_passes: ")[1].split()[0])
        check(status == (0 if fp >= 2 else 2), f"probe exit status {status} with FP {fp}/3")
    if FAILURES:
        print(f"0 passed, {len(FAILURES)} failed")
        return 1
    print("quality harness smoke test: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
