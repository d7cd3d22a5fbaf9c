"""`neoxja generate`: continue a prompt (or each line of stdin) with a model.

    neoxja generate "吾輩は猫である。" --model DIR_OR_HUB_ID --max-new-tokens 50
    printf '春はあけぼの\\n夏は夜\\n' | neoxja generate --greedy --no-stream

Text goes to stdout, a one-line timing summary to stderr. Without --model, the bundled model is used.
"""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neoxja generate",
        description="Generate text from PROMPT, or from each line of stdin when PROMPT is not given "
                    "(those prompts are generated in batches).",
    )
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="text to continue (default: read stdin, one prompt a line)")
    p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="model directory or Hugging Face hub id (default: the bundled model)")
    p.add_argument("--max-new-tokens", type=int, default=50, metavar="N", help="new tokens per sequence (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="sample from the K most likely tokens; 0: all (default 50)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1] (default 1.0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="penalty > 1 discourages repeats (default 1.0: off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N", help="forbid repeating any N-gram (default 0: off)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed, for reproducible sampling")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--num-return-sequences", type=int, default=1, metavar="N", help="sequences per prompt (sampling only)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype; auto (the default): the device's fast precision, bfloat16 on a CPU with "
                        "AMX-BF16 or AVX512-BF16 or a GPU that supports it, else float32 (float32 with --quantize); "
                        "float32 gives transformers' numbers")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default cpu)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="int8: int8 weights, CPU only (default none)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (default: on for a single sequence at a time)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts from stdin generated together (default 8)")
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"neoxja generate: error: {message}", file=sys.stderr)
    return code


def resolve_model(model: str | None) -> str:
    """--model, or else the bundled model; a clear error when neither is available."""
    if model:
        return model
    try:
        from neoxja.assets import default_model_dir
    except ImportError:
        default_model_dir = None
    if default_model_dir is not None:
        path = default_model_dir()
        if (path / "config.json").is_file():
            return str(path)
    raise FileNotFoundError("no --model given and no bundled model is installed: pass --model DIR_OR_HUB_ID")


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if sys.stdin.isatty():
        print("reading prompts from stdin, one per line (Ctrl-D to finish)", file=sys.stderr)
    # blank lines are skipped; an intentionally empty prompt can be given as PROMPT ""
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def check_args(args) -> None:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_return_sequences < 1:
        raise ValueError(f"--num-return-sequences must be >= 1, got {args.num_return_sequences}")
    if args.greedy and args.num_return_sequences > 1:
        raise ValueError("--num-return-sequences > 1 needs sampling (drop --greedy)")
    if not args.greedy and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 (use --greedy for greedy decoding), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if not args.repetition_penalty > 0:
        raise ValueError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.no_repeat_ngram_size < 0:
        raise ValueError(f"--no-repeat-ngram-size must be >= 0, got {args.no_repeat_ngram_size}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stream and args.num_return_sequences > 1:
        raise ValueError("--stream shows one sequence at a time: use --no-stream with --num-return-sequences > 1")
    if args.quantize == "int8" and not args.device.startswith("cpu"):
        raise ValueError("--quantize int8 runs on the CPU only (FBGEMM); use --device cpu")


def resolve_dtype(name: str, device, quantize: str) -> tuple:
    """(torch dtype, why) for --dtype: auto asks neoxja.hardware for the device's fast precision."""
    import torch

    if name != "auto":
        return getattr(torch, name), "--dtype"
    if quantize != "none":
        return torch.float32, "auto: the int8 layers take float32 activations"
    from neoxja.hardware import dtype_choice

    dtype, reason = dtype_choice(device)
    return dtype, f"auto: {reason}"


def count_new_tokens(new: "torch.Tensor", eos_ids: list[int]) -> int:  # noqa: F821
    """New tokens actually produced: each row up to and including its first EOS (the rest is padding)."""
    import torch

    if not eos_ids or new.numel() == 0:
        return new.numel()
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # positions after the first EOS
    return int((~after_eos).sum())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        model_path = resolve_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    prompts = read_prompts(args)
    if not prompts:
        return _fail("no prompt: give PROMPT or lines on stdin")

    import torch

    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.quantization import quantize
    from neoxja.streaming import TextStreamer
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)  # a device this machine and build lack fails here, not mid-load
    except Exception as e:  # noqa: BLE001 -- torch raises RuntimeError or AssertionError, by backend
        return _fail(f"--device {args.device}: {e}")

    t_load = time.perf_counter()
    try:
        tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(model_path)
        dtype, dtype_reason = resolve_dtype(args.dtype, device, args.quantize)
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(model_path, dtype=dtype, device=device)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        return _fail(f"cannot load the model from {model_path!r}: {e}", 1)
    model.eval()
    if args.quantize != "none":
        quantize(model, args.quantize)
    streaming = args.stream if args.stream is not None else args.num_return_sequences == 1
    if args.num_return_sequences * (1 if streaming else min(args.batch_size, len(prompts))) > 1:
        from neoxja.kernels import choose_linear_kernels  # several rows per decoding step

        choose_linear_kernels(model)  # measured once per machine, then cached; CPU float layers only
    tokenizer.padding_side = "left"
    load_seconds = time.perf_counter() - t_load
    # every prompt is checked before any is generated, so a bad line costs no output of the others
    limit = model.config.max_position_embeddings
    too_long = [f"{'line ' + str(i + 1) if args.prompt is None else 'PROMPT'} ({len(ids)} tokens)"
                for i, ids in enumerate(tokenizer(prompts)["input_ids"]) if len(ids) > limit]
    if too_long:
        return _fail(f"longer than the model's max_position_embeddings={limit}: {', '.join(too_long[:10])}"
                     f"{' ...' if len(too_long) > 10 else ''}; shorten these prompts")

    stream = args.stream if args.stream is not None else args.num_return_sequences == 1
    batch_size = 1 if stream else args.batch_size
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    eos = model.config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    prompt_tokens = new_tokens = 0
    t_gen = time.perf_counter()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            enc = tokenizer(batch, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                num_return_sequences=args.num_return_sequences, generator=generator, streamer=streamer,
            )
            prompt_tokens += int(mask.sum())
            prompt_width = max(ids.shape[1], 1)  # empty prompts start from BOS, which generate() adds
            new_tokens += count_new_tokens(out[:, prompt_width:], eos_ids)
            if not stream:
                for text in tokenizer.batch_decode(out, skip_special_tokens=True):
                    print(text, flush=True)
    except ValueError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t_gen
    print(f"prompt tokens {prompt_tokens}, new tokens {new_tokens}, {seconds:.2f} s, "
          f"{new_tokens / max(seconds, 1e-9):.1f} tokens/s (model loaded in {load_seconds:.2f} s), "
          f"{str(dtype).removeprefix('torch.')} ({dtype_reason})", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
