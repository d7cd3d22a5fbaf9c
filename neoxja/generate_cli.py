"""`neoxja generate`: continue a prompt (or each line of stdin) with a model.

    neoxja generate "吾輩は猫である。" --model DIR_OR_HUB_ID --max-new-tokens 50
    printf '春はあけぼの\\n夏は夜\\n' | neoxja generate --greedy --no-stream
    neoxja generate --output-format jsonl < prompts.txt > outputs.jsonl

Text goes to stdout, a one-line timing summary to stderr. Without --model, the bundled model is used.
Several outputs in text format are each headed by `==> stdin line N <==` (file line numbers; blank lines are
skipped but counted); `--output-format jsonl` writes one JSON object per output instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings

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
    p.add_argument("--seed", type=int, metavar="S", help="random seed, for reproducible sampling (default: none, a different draw each run)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (default: off, sampling)")
    p.add_argument("--num-return-sequences", type=int, default=1, metavar="N", help="sequences per prompt, sampling only (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype; auto (the default): the device's fast precision, bfloat16 on a CPU with "
                        "AMX-BF16 or AVX512-BF16 or a GPU that supports it, else float32 (float32 with --quantize); "
                        "float32 gives transformers' numbers")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default cpu)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="int8: int8 weights, CPU only; int4: 4-bit weights (groups of 128), quantized layer by layer "
                        "as they load, CPU or CUDA (default none)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode steps through torch.compile: pays off for long outputs and small models "
                        "(the bundled one decodes 5-6x faster, 8 steps per compiled call); the first step of each "
                        "batch shape compiles (counted in the summary's time: on the bundled model ~2 minutes the "
                        "first time on a 2-core machine, ~10 s later, as inductor caches it on disk) (default: off, eager)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (default: on for a single sequence at a time)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts from stdin generated together (default 8)")
    p.add_argument("--output-format", choices=("text", "jsonl"), default="text",
                   help="text: each prompt and its continuation; several outputs are each headed by a line "
                        "'==> stdin line N <==' and separated by a blank line. jsonl: one JSON object per "
                        "output (prompt, text, prompt_tokens, new_tokens, finish_reason) (default text)")
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"neoxja generate: error: {message}", file=sys.stderr)
    return code


def resolve_model(model: str | None) -> str:
    """--model, or else the bundled model; a clear error when neither is available."""
    from neoxja.assets import bundled_model_dir

    if model:
        return model
    path = bundled_model_dir()
    if path is None:
        raise FileNotFoundError("no --model given and no bundled model is installed: pass --model DIR_OR_HUB_ID")
    return str(path)


def _utf8(raw: bytes, where: str) -> str:
    """`raw` decoded as UTF-8, or a ValueError naming `where` and the byte offset of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: invalid UTF-8 at byte offset {e.start} (byte 0x{raw[e.start]:02x}); "
                         "prompts must be UTF-8 text") from None


def read_prompts(args) -> list[tuple[int | None, str]]:
    """(stdin line number, prompt) pairs; the line number is None for PROMPT. Blank lines are skipped but
    counted, so numbers are those of the file; a UTF-8 BOM is dropped; invalid UTF-8 is a ValueError."""
    if args.prompt is not None:
        # bytes that are not UTF-8 reach sys.argv as lone surrogates (surrogateescape): get them back
        try:
            raw = args.prompt.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:
            raise ValueError(f"PROMPT: not text: a lone surrogate at character {e.start}") from None
        return [(None, _utf8(raw, "PROMPT"))]
    if sys.stdin.isatty():
        print("reading prompts from stdin, one per line (Ctrl-D to finish)", file=sys.stderr)
    # bytes, so that a bad line is found with its offset (text streams in tests have no .buffer)
    source = getattr(sys.stdin, "buffer", None)
    lines = source if source is not None else (line.encode("utf-8", "surrogateescape") for line in sys.stdin)
    prompts = []
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
        text = _utf8(raw, f"stdin line {number}").rstrip("\r\n")
        # blank lines are skipped; an intentionally empty prompt can be given as PROMPT ""
        if text.strip():
            prompts.append((number, text))
    return prompts


# generate()'s argument names in sampling's messages -> this command's options
_OPTION_NAMES = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                 "repetition_penalty": "--repetition-penalty", "no_repeat_ngram_size": "--no-repeat-ngram-size",
                 "do_sample=False": "--greedy"}
_OPTION_RE = re.compile(r"\b(" + "|".join(re.escape(name) for name in _OPTION_NAMES) + r")(?![\w=])")


def check_args(args) -> None:
    """ValueError for an impossible option. The sampling options are checked by the one rule that
    generate() applies (sampling.validate_sampling_args), its messages spelled with this command's options."""
    from neoxja.sampling import validate_sampling_args

    try:
        validate_sampling_args(not args.greedy, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                               args.no_repeat_ngram_size)
    except ValueError as e:
        raise ValueError(_OPTION_RE.sub(lambda m: _OPTION_NAMES[m.group(1)], str(e))) from None
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_return_sequences < 1:
        raise ValueError(f"--num-return-sequences must be >= 1, got {args.num_return_sequences}")
    if args.greedy and args.num_return_sequences > 1:
        raise ValueError("--num-return-sequences > 1 needs sampling (drop --greedy)")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stream and args.output_format == "jsonl":
        raise ValueError("--stream prints text: use --no-stream (the default) with --output-format jsonl")
    if args.stream and args.num_return_sequences > 1:
        raise ValueError("--stream shows one sequence at a time: use --no-stream with --num-return-sequences > 1")
    check_quantize_device(args.quantize, args.device)


def check_quantize_device(quantize: str, device: str) -> None:
    """--quantize's devices (neoxja generate and neoxja serve): int8 the CPU, int4 the CPU or CUDA."""
    if quantize == "int8" and not device.startswith("cpu"):
        raise ValueError("--quantize int8 runs on the CPU only (FBGEMM); use --device cpu")
    if quantize == "int4" and not device.startswith(("cpu", "cuda")):
        raise ValueError("--quantize int4 runs on CPU or CUDA (torch's int4 kernels); use --device cpu or cuda")


def load_model(model_path, quantize: str, dtype, device):
    """The model in eval mode, for --quantize (neoxja generate and neoxja serve): int4 quantized layer by layer
    as it loads (the float model never exists whole), int8 quantized once loaded, "none" as loaded."""
    from neoxja.model import GPTNeoXJapaneseForCausalLM
    from neoxja.quantization import load_quantized
    from neoxja.quantization import quantize as quantize_model

    if quantize == "int4":
        model = load_quantized(model_path, "int4", dtype=dtype, device=device)
    else:
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(model_path, dtype=dtype, device=device)
    model.eval()
    if quantize == "int8":
        try:
            quantize_model(model, "int8")
        except (RuntimeError, ValueError) as e:  # said as what failed: the quantizing, not the loading
            raise RuntimeError(f"--quantize int8 failed: {e}") from e
    return model


def int4_kernels_note(model) -> str:
    """", int4 kernel NAME" for each int4 kernel the model's layers run on (none: "")."""
    from neoxja.quantization import Int4WeightOnlyLinear

    kernels = {m.kernel for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)}
    return "".join(f", int4 kernel {kernel}" for kernel in sorted(kernels))


def row_results(new: "torch.Tensor", eos_ids: list[int], room: list[int]) -> list[tuple[list[int], str]]:  # noqa: F821
    """Per row of `new` (B, N), the new tokens it produced and why it ended: up to and including its
    first EOS ("stop"), or its first `room[row]` tokens, the most it could take ("length")."""
    results = []
    for row, ids in enumerate(new.tolist()):
        ids = ids[: room[row]]
        ends = [i for i, t in enumerate(ids) if t in eos_ids]
        results.append((ids[: ends[0] + 1], "stop") if ends else (ids, "length"))
    return results


def resolve_dtype(name: str, device, quantize: str) -> tuple:
    """(torch dtype, why) for --dtype: auto asks neoxja.hardware for the device's fast precision."""
    import torch

    if name != "auto":
        return getattr(torch, name), "--dtype"
    if quantize != "none":
        return torch.float32, f"auto: the {quantize} layers take float32 activations"
    from neoxja.hardware import dtype_choice

    dtype, reason = dtype_choice(device)
    return dtype, f"auto: {reason}"


def label(number: int | None) -> str:
    return "PROMPT" if number is None else f"stdin line {number}"


def print_header(number: int | None, first: bool, sequence: int = 0, n: int = 1) -> None:
    """The line that heads each of several text outputs (as `head` heads files), after a blank line."""
    if not first:
        print()
    print(f"==> {label(number)}{f', sequence {sequence + 1}/{n}' if n > 1 else ''} <==", flush=True)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        model_path = resolve_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    try:
        numbered = read_prompts(args)
    except ValueError as e:
        return _fail(str(e))
    prompts = [text for _, text in numbered]
    if not prompts:
        return _fail("no prompt: give PROMPT or lines on stdin")

    import torch

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
        model = load_model(model_path, args.quantize, dtype, device)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        return _fail(f"cannot load the model from {model_path!r}: {e}", 1)
    from neoxja.kernels import choose_linear_kernels

    choose_linear_kernels(model, on_measure=lambda path: print(  # measured once per machine, then cached
        f"neoxja generate: note: timing the weight-product kernels on this CPU, once"
        f"{f' (cached in {path})' if path else ''}", file=sys.stderr, flush=True))
    tokenizer.padding_side = "left"
    load_seconds = time.perf_counter() - t_load
    # every prompt is checked before any is generated, so a bad line costs no output of the others
    limit = model.config.max_position_embeddings
    prompt_lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    too_long = [f"{label(number)} ({length} tokens)" for (number, _), length in zip(numbered, prompt_lengths) if length > limit]
    if too_long:
        return _fail(f"longer than the model's max_position_embeddings={limit}: {', '.join(too_long[:10])}"
                     f"{' ...' if len(too_long) > 10 else ''}; shorten these prompts")
    if max(prompt_lengths) + args.max_new_tokens > limit:  # said once here; generate()'s own warning is silenced below
        print(f"neoxja generate: note: --max-new-tokens {args.max_new_tokens} reaches past the model's "
              f"max_position_embeddings={limit}: each output stops at {limit} tokens, its prompt included",
              file=sys.stderr)

    stream = args.stream if args.stream is not None else (args.num_return_sequences == 1 and args.output_format == "text")
    batch_size = 1 if stream else args.batch_size
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    eos = model.config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    n = args.num_return_sequences
    headers = len(prompts) * n > 1  # one output needs no header

    prompt_tokens = new_tokens = 0
    t_gen = time.perf_counter()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            enc = tokenizer(batch, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            if stream and headers:
                print_header(numbered[start][0], first=start == 0)
            streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*max_position_embeddings", category=UserWarning)
                out = model.generate(
                    ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                    num_return_sequences=n, generator=generator, streamer=streamer,
                    vocab_limit=len(tokenizer),  # a model padded past its tokenizer never yields an undecodable id
                    compile=args.compile,
                )
            prompt_width = max(ids.shape[1], 1)  # empty prompts start from BOS, which generate() adds
            lengths = mask.sum(dim=1).repeat_interleave(n).tolist()  # each output's prompt tokens
            room = [min(args.max_new_tokens, limit - max(length, 1)) for length in lengths]
            results = row_results(out[:, prompt_width:], eos_ids, room)
            prompt_tokens += int(mask.sum())
            new_tokens += sum(len(new) for new, _ in results)
            if stream:
                continue
            for row, (new, finish_reason) in enumerate(results):
                index = start + row // n
                number, prompt = numbered[index]
                if args.output_format == "jsonl":
                    record = {"line": number, "prompt": prompt, "sequence": row % n,
                              "text": tokenizer.decode(new, skip_special_tokens=True),
                              "prompt_tokens": lengths[row], "new_tokens": len(new), "finish_reason": finish_reason}
                    print(json.dumps(record, ensure_ascii=False), flush=True)
                    continue
                if headers:
                    print_header(number, first=index == 0 and row % n == 0, sequence=row % n, n=n)
                print(tokenizer.decode(out[row].tolist(), skip_special_tokens=True), flush=True)
    except ValueError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except RuntimeError as e:  # torch.compile failing on this machine (no C++ compiler, ...): one clear line
        if not (args.compile and isinstance(e, torch._dynamo.exc.TorchDynamoException)):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return _fail(f"--compile: torch.compile failed on this machine ({first.strip()}); run without --compile", 1)
    seconds = time.perf_counter() - t_gen
    int4_note = int4_kernels_note(model)
    print(f"prompt tokens {prompt_tokens}, new tokens {new_tokens}, {seconds:.2f} s, "
          f"{new_tokens / max(seconds, 1e-9):.1f} tokens/s (model loaded in {load_seconds:.2f} s), "
          f"{str(dtype).removeprefix('torch.')} ({dtype_reason}){int4_note}"
          f"{', compiled decode step (compiling counted in the time)' if args.compile else ''}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader left (`neoxja generate ... | head -1`): stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at the exit's flush
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
