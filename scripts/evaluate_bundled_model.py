"""Measure the bundled model: validation bits per character, samples, generation speed, size.

    .venv/bin/python scripts/evaluate_bundled_model.py --data /tmp/aozora-small/data [--model DIR]

- bits per character on the whole validation split written by `neoxja prepare` (DATA/val.bin and
  val_docs.npy: whole held-out works). Each work is scored from its start in windows of the model's
  context (max_position_embeddings) that do not overlap, after the <|endoftext|> that precedes it:
  sum of -log2 p(token) over the work's tokens (its closing <|endoftext|> excluded) / its characters.
  The characters are those of the decoded work, so the figure can be compared across vocabularies.
- the same figure on the fixed validation slice that tests/test_bundled_model.py checks;
- greedy and sampled continuations of a few prompts (seeded);
- generation speed (new tokens per second, batch 1, float32, this machine's CPU), and with
  --reference transformers' speed on the same files in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

PROMPTS = ["吾輩は猫である。", "山路を登りながら、こう考えた。", "その夜、彼は"]


def work_bits(model, ids, window: int, eos: int):
    """-log2 p of every token of one work (ids, without its closing EOS), scored after an EOS."""
    import torch

    seq = torch.tensor([[eos] + list(ids)])
    bits = 0.0
    for start in range(0, seq.shape[1] - 1, window):
        chunk = seq[:, start : start + window + 1]
        with torch.no_grad():
            logits = model(chunk[:, :-1]).logits.float()
        bits += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item() / math.log(2)
    return bits


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from neoxja.assets import default_model_dir
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="directory written by `neoxja prepare`")
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--corpus", type=Path, help="the shared corpus, for the test's validation slice")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--reference", action="store_true", help="also time transformers' generate on the same files")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    tok = GPTNeoXJapaneseTokenizer.from_pretrained(str(args.model))
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    window = model.config.max_position_embeddings
    files = sorted(f for f in args.model.iterdir() if f.is_file())
    results: dict = {
        "model": str(args.model),
        "parameters": model.num_parameters(),
        "bytes": sum(f.stat().st_size for f in files),
        "weights_dtype": json.loads((args.model / "config.json").read_text()).get("dtype"),
    }

    val = np.memmap(args.data / "val.bin", dtype=json.loads((args.data / "manifest.json").read_text())["dtype"], mode="r")
    offsets = np.load(args.data / "val_docs.npy")
    bits = chars = tokens = 0
    start = time.perf_counter()
    for a, b in zip(offsets[:-1], offsets[1:]):
        ids = [int(i) for i in val[a:b]]
        assert ids[-1] == tok.eos_token_id
        ids = ids[:-1]
        bits += work_bits(model, ids, window, tok.eos_token_id)
        chars += len(tok.decode(ids))
        tokens += len(ids)
    results["val"] = {"works": len(offsets) - 1, "tokens": tokens, "chars": chars, "bits_per_char": bits / chars,
                      "bits_per_token": bits / tokens, "seconds": time.perf_counter() - start}
    print(f"validation: {results['val']['works']} works, {chars:,} chars, {tokens:,} tokens: "
          f"{bits / chars:.4f} bits/char, {bits / tokens:.4f} bits/token (perplexity/token {2 ** (bits / tokens):.1f})")

    if args.corpus:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from test_bundled_model import slice_bits_per_char, validation_slice

        slice_bpc = slice_bits_per_char(model, tok, validation_slice(args.corpus), window)
        results["test_slice_bits_per_char"] = slice_bpc
        print(f"test slice: {slice_bpc:.4f} bits/char")

    results["samples"] = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        greedy = model.generate(ids, max_new_tokens=60)
        sampled = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=60,
                                 generator=torch.Generator().manual_seed(0))
        sample = {"prompt": prompt, "greedy": tok.decode(greedy[0].tolist(), skip_special_tokens=True),
                  "sampled (temperature 0.8, top_p 0.95, seed 0)": tok.decode(sampled[0].tolist(), skip_special_tokens=True)}
        results["samples"].append(sample)
        print(json.dumps(sample, ensure_ascii=False, indent=1))

    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    model.generate(ids, max_new_tokens=8)  # warm-up
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=200, min_new_tokens=200)
        runs.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    results["generate_tokens_per_s"] = max(runs)
    print(f"generation: {max(runs):.0f} new tokens/s (batch 1, float32, greedy, best of 3 x 200 tokens, "
          f"{torch.get_num_threads()} threads)")
    if args.reference:  # the same files through transformers, same run, same settings
        import transformers

        ref = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
        ref.generate(ids, max_new_tokens=8, do_sample=False)
        ref_runs = []
        for _ in range(3):
            t = time.perf_counter()
            out = ref.generate(ids, max_new_tokens=200, min_new_tokens=200, do_sample=False)
            ref_runs.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
        results["transformers_generate_tokens_per_s"] = max(ref_runs)
        print(f"transformers {transformers.__version__}: {max(ref_runs):.0f} new tokens/s; "
              f"neoxja / transformers = {max(runs) / max(ref_runs):.2f}")
    print(f"size: {results['parameters'] / 1e6:.2f}M parameters, {results['bytes'] / 1e6:.2f} MB on disk")
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
