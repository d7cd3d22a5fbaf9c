"""GPT-NeoX-Japanese tokenizer: the sub-word encoder of Japanese-BPEEncoder_V2, exact and fast.

The encoder (as ported to transformers' `GPTNeoXJapaneseTokenizer`) works in two steps:

1. normalise the text: spaces, newlines and tabs become the tags <SP>, <BR>, <TAB>; '—' and '−'
   become 'ー'; every emoji of emoji.json becomes its class tag (<|emoji1|> ...); with
   `do_clean_text`, URLs, e-mail addresses, phone numbers, dates and prices become tags;
2. scan left to right: at each position the candidates are the vocabulary entries of at most
   3 characters (up to the longest entry when the text there starts with '<'); a '<...'
   candidate longer than 2 characters wins at once, otherwise the lowest id wins; a character
   with no candidate becomes <KIGOU>, <U2000U2BFF> or its UTF-8 byte tokens <|byteN|>.

Three defects of the port are fixed, as the original encoder has them right:
the vocabulary line "," is the comma token (the port loses it and falls back to <|byte44|>);
a run of byte tokens decodes as one UTF-8 sequence and nothing is stripped, so
decode(encode(s)) == s up to the documented many-to-one mappings; the price pattern of
`do_clean_text` matches what the original matches, in linear time (see _tokenizer_clean).

The scan runs in C when the optional extension `neoxja._tokenizer_scan` was built, and in
Python otherwise (`_scan_py`); both give the same ids.
"""

from __future__ import annotations

import json
import operator
import os
import re
from pathlib import Path

try:  # compiled fast path, built by setup.py when a C compiler is available
    from neoxja._tokenizer_scan import Scanner as _CScanner
except ImportError:  # pragma: no cover - depends on the build
    _CScanner = None

VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt", "emoji_file": "emoji.json"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# How the non-literal tags decode (emoji tags decode through emoji.json's "emoji_inv").
TAG_TEXT = {"<SP>": " ", "<BR>": "\n", "<TAB>": "\t", "<BLOCK>": "▀", "<KIGOU>": "ǀ", "<U2000U2BFF>": "‖"}

# Text replacements made before the emoji map, in the original order.
_PRE_REPLACEMENTS = (
    (" ", "<SP>"),
    ("\u3000", "<SP>"),
    ("\r\n", "<BR>"),
    ("\n", "<BR>"),
    ("\r", "<BR>"),
    ("\t", "<TAB>"),
    ("—", "ー"),
    ("−", "ー"),
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BYTE_TOKEN = re.compile(r"<\|byte(\d+)\|>")


class EmojiReplacer:
    """emoji.json's "emoji" map applied as the original does: `text.replace(key, tag)` for each key in
    order, visiting only the keys that can occur.

    A key can occur after the replacements only if it occurs in the text before them, or if it
    shares a character with a replacement tag (only then can a replacement create it).
    """

    def __init__(self, emoji: dict[str, str]):
        self.items = list(emoji.items())
        tag_chars = set("".join(emoji.values()))
        self.by_first: dict[str, list[int]] = {}
        self.risky = []
        for order, (key, _) in enumerate(self.items):
            self.by_first.setdefault(key[0], []).append(order)
            if tag_chars & set(key):
                self.risky.append(order)
        # Finds the keys' first characters; one range stands for all astral ones, which keeps
        # the class a fast BMP lookup table (the astral hits are filtered below).
        bmp = "".join(re.escape(c) for c in self.by_first if ord(c) < 0x10000)
        self.first = re.compile(f"[{bmp}\U00010000-\U0010ffff]")

    def __call__(self, text: str) -> str:
        present = set(self.first.findall(text))
        if not present:
            return text
        by_first, items = self.by_first, self.items
        orders = [o for c in present for o in by_first.get(c, ()) if items[o][0] in text]
        if not orders:
            return text
        for order in sorted(set(orders).union(self.risky)):
            key, tag = items[order]
            if key in text:
                text = text.replace(key, tag)
        return text


def normalize_text(text: str, replace_emoji: EmojiReplacer) -> str:
    """The text the encoder looks tokens up in, before the optional cleaning (do_clean_text): tags for
    spaces, line breaks and tabs, dashes as ー, then the emoji map. The one definition that both the
    tokenizer and the vocabulary builder (neoxja.vocab) use."""
    for old, new in _PRE_REPLACEMENTS:
        if old in text:
            text = text.replace(old, new)
    return replace_emoji(text)


# --- files ------------------------------------------------------------------------------------------


def load_vocab(vocab_file: str | os.PathLike) -> list[list[str]]:
    """Read vocab.txt: line i is token i; a line with commas lists spellings of one token.

    Like the original encoder (and unlike the transformers port), the line that is exactly ","
    is the comma itself.
    """
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8") from None
    # Universal newlines, as the original reads the file in text mode.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}, line 1: the vocabulary is empty")
    tokens = []
    for number, line in enumerate(lines, start=1):
        spellings = [line] if (line == "," or "," not in line) else line.split(",")
        if "" in spellings:
            raise ValueError(f"{path}, line {number}: empty token {line!r}")
        tokens.append(spellings)
    return tokens


def load_emoji(emoji_file: str | os.PathLike) -> dict:
    """Read emoji.json: {"emoji": {emoji: tag}, "emoji_inv": {tag: representative}}."""
    path = Path(emoji_file)
    if not path.is_file():
        raise FileNotFoundError(f"emoji file not found: {path}")
    try:
        emoji = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(emoji, dict) or not all(isinstance(emoji.get(k), dict) for k in ("emoji", "emoji_inv")):
        raise ValueError(f"{path}, line 1: expected an object with 'emoji' and 'emoji_inv' objects")
    for part in ("emoji", "emoji_inv"):
        for key, value in emoji[part].items():
            # empty values would let one replacement create another key (the encoder assumes none does);
            # JSON can escape half a surrogate pair, which is no text
            if not key or not isinstance(value, str) or not value or not _is_text(key) or not _is_text(value):
                raise ValueError(f"{path}: bad entry {key!r}: {value!r} in {part!r} "
                                 "(keys and values must be non-empty text)")
    return emoji


def _is_text(s: str) -> bool:
    """Whether s has a UTF-8 form (a lone surrogate has none)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- the scan ---------------------------------------------------------------------------------------


def _is_kigou(c: int) -> bool:
    """The original tests 2-byte UTF-8 values C2A1-C2BF, C780-C783, CAB9-CBBF, CC80-CDA2."""
    return 0xA1 <= c <= 0xBF or 0x1C0 <= c <= 0x1C3 or 0x2B9 <= c <= 0x362


def _is_u2e(c: int) -> bool:
    """The original tests 3-byte UTF-8 values E28080-E2B07F: U+2000-U+2BFF."""
    return 0x2000 <= c <= 0x2BFF


def _scan_py(text: str, vocab: dict[str, int], maxlen: int) -> list[str]:
    """Reference scan (the original's loop): the list of token strings of normalised text."""
    tokens = []
    pos, n = 0, len(text)
    while pos < n:
        angle = text[pos] == "<"
        end = min(n, pos + maxlen + 1) if angle else min(n, pos + 3)
        best_id, best = -1, ""
        for e in range(end, pos, -1):
            word = text[pos:e]
            token_id = vocab.get(word)
            if token_id is None:
                continue
            if angle and len(word) > 2:  # a tag-like token wins at once
                best = word
                break
            if best_id < 0 or token_id < best_id:
                best_id, best = token_id, word
        if best:
            tokens.append(best)
            pos += len(best)
            continue
        c = ord(text[pos])
        if _is_kigou(c):
            tokens.append("<KIGOU>")
        elif _is_u2e(c):
            tokens.append("<U2000U2BFF>")
        else:
            tokens.extend(f"<|byte{b}|>" for b in text[pos].encode("utf-8"))
        pos += 1
    return tokens


# --- the tokenizer ----------------------------------------------------------------------------------


class BatchEncoding(dict):
    """The mapping a tokenizer call returns (input_ids, attention_mask), with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        """Move torch tensors to device (for return_tensors="pt")."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class GPTNeoXJapaneseTokenizer:
    """Tokenizer of GPT-NeoX-Japanese (abeja/gpt-neox-japanese-2.7b), as documented in transformers.

    >>> tok = GPTNeoXJapaneseTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")  # doctest: +SKIP
    >>> tok("吾輩は猫である🐯。実は慶応(慶應)大学出身")["input_ids"]  # doctest: +SKIP
    [30014, 26883, 26638, 27228, 25, 26650, 31732, 31679, 27809, 26638, 17749, 31592, 17749, 31593, 321, 1281]
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        emoji_file,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        do_clean_text=False,
        *,
        padding_side="right",
        truncation_side="right",
        model_max_length=None,
        name_or_path="",
        use_compiled=None,
        **kwargs,
    ):
        self.vocab_file, self.emoji_file = str(vocab_file), str(emoji_file)
        self.ids_to_tokens = load_vocab(vocab_file)
        self.emoji = load_emoji(emoji_file)
        self.do_clean_text = bool(do_clean_text)
        self.unk_token, self.pad_token, self.bos_token, self.eos_token = unk_token, pad_token, bos_token, eos_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = int(model_max_length) if model_max_length is not None else int(1e30)
        self.name_or_path = str(name_or_path)
        self.init_kwargs = kwargs  # other tokenizer_config.json keys, kept for save_pretrained

        # spelling -> id (a spelling on several lines keeps the last); line text -> id
        self.vocab: dict[str, int] = {}
        self.raw_vocab: dict[str, int] = {}
        for token_id, spellings in enumerate(self.ids_to_tokens):
            self.raw_vocab[",".join(spellings)] = token_id
            for spelling in spellings:
                self.vocab[spelling] = token_id
        self.maxlen = max(len(w) for w in self.vocab)

        unk_id = self.vocab.get(unk_token) if unk_token is not None else None
        fallback = {name: self.vocab.get(name, unk_id) for name in ["<KIGOU>", "<U2000U2BFF>"]}
        fallback.update({f"<|byte{b}|>": self.vocab.get(f"<|byte{b}|>", unk_id) for b in range(256)})
        missing = [name for name, token_id in fallback.items() if token_id is None]
        if missing:
            raise ValueError(
                f"{vocab_file}: the vocabulary lacks fallback tokens {missing[:3]}... and the unk token {unk_token!r}"
            )
        self._fallback_ids = fallback
        self._byte_ids = [fallback[f"<|byte{b}|>"] for b in range(256)]

        self._init_emoji_map()
        self._init_decoder()
        # Only entries the scan can meet: at most 3 characters, or starting with '<'.
        self._scan_entries = {w: i for w, i in self.vocab.items() if len(w) <= 3 or w[0] == "<"}
        if use_compiled is None:
            use_compiled = _CScanner is not None
        if use_compiled and _CScanner is None:
            raise RuntimeError("the compiled scan neoxja._tokenizer_scan is not built")
        self._c_scanner = self._make_scanner() if use_compiled else None

    def _make_scanner(self):
        ids = self._fallback_ids
        return _CScanner(self._scan_entries, self.maxlen, self._byte_ids, ids["<KIGOU>"], ids["<U2000U2BFF>"])

    def __getstate__(self):
        # The compiled scanner is rebuilt on unpickling (for multiprocessing workers, deepcopy).
        state = self.__dict__.copy()
        state["_c_scanner"] = self._c_scanner is not None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        compiled = state["_c_scanner"] and _CScanner is not None
        self._c_scanner = self._make_scanner() if compiled else None

    def _init_emoji_map(self):
        self._emoji_replacer = EmojiReplacer(self.emoji["emoji"])

    def _init_decoder(self):
        """Per id: its UTF-8 bytes when decoded (a byte token is its one byte)."""
        emoji_inv = self.emoji["emoji_inv"]
        self._id_bytes: list[bytes] = []
        self._id_text: list[str] = []
        for spellings in self.ids_to_tokens:
            word = spellings[0]
            byte = _BYTE_TOKEN.fullmatch(word)
            if byte and int(byte.group(1)) < 256:
                self._id_bytes.append(bytes([int(byte.group(1))]))
                self._id_text.append(self._id_bytes[-1].decode("utf-8", errors="replace"))
                continue
            if word.startswith("<|emoji") and word.endswith("|>"):
                text = emoji_inv.get(word, word)
            else:
                text = TAG_TEXT.get(word, word)
            self._id_text.append(text)
            self._id_bytes.append(text.encode("utf-8"))

    # --- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        revision=None,
        cache_dir=None,
        local_files_only=False,
        token=None,
        subfolder=None,
        **kwargs,
    ):
        """Load from a directory, or from a hub id through huggingface_hub (its cache and offline mode apply)."""
        from neoxja.hub import resolve_model_path  # a leaf module (imports nothing of ours): one resolver

        name = os.fspath(pretrained_model_name_or_path)
        directory = resolve_model_path(
            name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, subfolder=subfolder,
            token=token, files=tuple(VOCAB_FILES_NAMES.values()), optional=(SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE),
        )

        def resolve(filename, required):
            path = directory / filename
            if required and not path.is_file():
                raise FileNotFoundError(f"{filename} not found in {directory}")
            return path if path.is_file() else None

        vocab_file = resolve(VOCAB_FILES_NAMES["vocab_file"], True)
        emoji_file = resolve(VOCAB_FILES_NAMES["emoji_file"], True)
        config = {}
        for filename in (SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE):  # the config wins
            path = resolve(filename, False)
            if path is not None:
                try:
                    loaded = json.loads(path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"{path}: invalid JSON ({exc})") from None
                if not isinstance(loaded, dict):
                    raise ValueError(f"{path}: expected a JSON object")
                config.update(loaded)
        init = {}
        for key in ("unk_token", "pad_token", "bos_token", "eos_token"):
            value = config.get(key)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                init[key] = value
        for key in ("do_clean_text", "padding_side", "truncation_side", "model_max_length"):
            if key in config and config[key] is not None:
                init[key] = config[key]
        init.update(kwargs)
        return cls(vocab_file, emoji_file, name_or_path=name, **init)

    def save_pretrained(self, save_directory) -> tuple[str, ...]:
        """Write vocab.txt, emoji.json, tokenizer_config.json, special_tokens_map.json (transformers' layout)."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        vocab_path = directory / VOCAB_FILES_NAMES["vocab_file"]
        emoji_path = directory / VOCAB_FILES_NAMES["emoji_file"]
        vocab_path.write_text("".join(",".join(s) + "\n" for s in self.ids_to_tokens), encoding="utf-8")
        emoji_path.write_text(json.dumps(self.emoji, ensure_ascii=False), encoding="utf-8")
        special = self.special_tokens_map
        config = dict(self.init_kwargs)
        config.update(special)
        config.update(
            tokenizer_class="GPTNeoXJapaneseTokenizer",
            do_clean_text=self.do_clean_text,
            padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            model_input_names=self.model_input_names,
        )
        if self.model_max_length < int(1e30):
            config["model_max_length"] = self.model_max_length
        config_path = directory / TOKENIZER_CONFIG_FILE
        special_path = directory / SPECIAL_TOKENS_MAP_FILE
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        special_path.write_text(json.dumps(special, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return tuple(str(p) for p in (vocab_path, emoji_path, config_path, special_path))

    # --- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of distinct vocabulary lines, as transformers counts (a repeated line counts once)."""
        return len(self.raw_vocab)

    def __len__(self) -> int:
        return len(self.raw_vocab)

    def get_vocab(self) -> dict[str, int]:
        """Line text -> id (as transformers: heterograph lines appear as 'a,b')."""
        return dict(self.raw_vocab)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.vocab[t] for t in self.all_special_tokens if t in self.vocab]

    def _special_id(self, token):
        if token is None:
            return None
        return self.vocab.get(token, self.vocab.get(self.unk_token))

    unk_token_id = property(lambda self: self._special_id(self.unk_token))
    pad_token_id = property(lambda self: self._special_id(self.pad_token))
    bos_token_id = property(lambda self: self._special_id(self.bos_token))
    eos_token_id = property(lambda self: self._special_id(self.eos_token))

    def convert_tokens_to_ids(self, tokens):
        """Token string(s) -> id(s); unknown strings map to the unk token's id."""
        unk = self.unk_token_id
        if isinstance(tokens, str):
            return self.vocab.get(tokens, unk)
        return [self.vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """Id(s) -> the text of each token on its own (as transformers: ' ' for <SP>, '🐯' for <|emoji4|>)."""
        if hasattr(ids, "tolist"):  # numpy / torch, also 0-d
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            return self._id_text[self._check_ids([ids])[0]]
        ids = self._check_ids(_as_id_list(ids))
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return [self._id_text[i] for i in ids]

    # --- encoding -------------------------------------------------------------------------------

    def _preprocess(self, text: str) -> str:
        """Step 1 of the encoder: the text the scan reads (tags for spaces, emoji, cleaned items)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        text = normalize_text(text, self._emoji_replacer)
        if self.do_clean_text:
            from neoxja._tokenizer_clean import clean_text

            text = clean_text(text)
        return text

    @staticmethod
    def _surrogate_error(text: str) -> ValueError:
        bad = _SURROGATE.search(text)
        where = f"at position {bad.start()}" if bad else ""
        return ValueError(f"text has a lone surrogate {bad.group() if bad else ''!r} {where}; it has no UTF-8 form")

    def _replace_emoji(self, text: str) -> str:
        """emoji.json applied as the original does: `text.replace(key, tag)` for each key in order."""
        return self._emoji_replacer(text)

    def tokenize(self, text: str) -> list[str]:
        """The tokens as the encoder finds them (spellings from the text, tags, <|byteN|>)."""
        try:
            return _scan_py(self._preprocess(text), self.vocab, self.maxlen)
        except UnicodeEncodeError:  # only a lone surrogate has no UTF-8 form
            raise self._surrogate_error(text) from None

    def encode(self, text: str, add_special_tokens=True, padding=False, truncation=None, max_length=None,
               return_tensors=None, **kwargs) -> list[int]:
        """Text -> token ids (the encoder adds no special tokens, as in transformers); padding, truncation
        and return_tensors as in __call__."""
        if (padding, truncation, max_length, return_tensors, kwargs) == (False, None, None, None, {}):
            return self._encode(text)  # the common case, without building a BatchEncoding
        kwargs["return_attention_mask"] = False  # only the ids are returned
        return self(text, padding=padding, truncation=truncation, max_length=max_length,
                    return_tensors=return_tensors, **kwargs)["input_ids"]

    def _encode(self, text: str) -> list[int]:
        normalized = self._preprocess(text)
        try:
            if self._c_scanner is not None:
                return self._c_scanner.scan(normalized)
            tokens = _scan_py(normalized, self.vocab, self.maxlen)
        except (ValueError, UnicodeEncodeError):  # only a lone surrogate makes the scan fail
            raise self._surrogate_error(text) from None
        vocab, fallback = self.vocab, self._fallback_ids
        return [vocab[t] if t in vocab else fallback[t] for t in tokens]

    def __call__(
        self,
        text,
        padding=False,
        truncation=None,
        max_length=None,
        return_tensors=None,
        return_attention_mask=None,
        add_special_tokens=True,
        padding_side=None,
        pad_to_multiple_of=None,
        return_token_type_ids=None,
    ) -> BatchEncoding:
        """Encode a str or a list of str, with padding/truncation as in transformers: truncation=None
        truncates to max_length when one is given without padding; return_attention_mask=None includes the
        mask; padding_side overrides self.padding_side for this call."""
        single = isinstance(text, str)
        if not single and not (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
            raise TypeError(f"text must be a str or a list of str, not {type(text).__name__}")
        batch = [self._encode(t) for t in ([text] if single else text)]
        if _truncation_on(truncation, max_length, padding):
            batch = [self._truncate(ids, max_length) for ids in batch]
        masks = [[1] * len(ids) for ids in batch]
        if padding not in (False, None, "do_not_pad"):
            batch, masks = self._pad(batch, masks, padding, max_length, padding_side, pad_to_multiple_of)
        if return_tensors is not None and len({len(ids) for ids in batch}) > 1:
            raise ValueError("sequences have different lengths: use padding=True to return tensors")
        out = BatchEncoding(input_ids=batch if not single else batch[0])
        if return_token_type_ids:  # one segment: all zeros, as transformers gives when asked
            out["token_type_ids"] = [[0] * len(ids) for ids in batch] if not single else [0] * len(batch[0])
        if return_attention_mask is None or return_attention_mask:
            out["attention_mask"] = masks if not single else masks[0]
        if return_tensors is not None:
            out = BatchEncoding({k: _to_tensor(v if not single else [v], return_tensors) for k, v in out.items()})
        return out

    def _truncate(self, ids: list[int], max_length) -> list[int]:
        limit = self.model_max_length if max_length is None else max_length
        if not _is_int(limit) or limit < 0:
            raise ValueError(f"max_length must be a non-negative int, not {limit!r}")
        if len(ids) <= limit:
            return ids
        if self.truncation_side == "left":
            return ids[len(ids) - limit :]
        if self.truncation_side != "right":
            raise ValueError(f"truncation_side must be 'left' or 'right', not {self.truncation_side!r}")
        return ids[:limit]

    def _pad(self, batch, masks, padding, max_length, padding_side=None, pad_to_multiple_of=None):
        if padding in (True, "longest"):
            target = max((len(ids) for ids in batch), default=0)
        elif padding == "max_length":
            target = self.model_max_length if max_length is None else max_length
            if not _is_int(target) or target < 0 or target >= int(1e30):
                raise ValueError("padding='max_length' needs max_length (or a model_max_length)")
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', not {padding!r}")
        if pad_to_multiple_of is not None:
            if not _is_int(pad_to_multiple_of) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int, not {pad_to_multiple_of!r}")
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.pad_token_id
        if pad_id is None:
            raise ValueError("padding needs a pad_token")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")
        left = side == "left"
        padded, padded_masks = [], []
        for ids, mask in zip(batch, masks):
            fill = max(0, target - len(ids))
            if left:
                padded.append([pad_id] * fill + ids)
                padded_masks.append([0] * fill + mask)
            else:
                padded.append(ids + [pad_id] * fill)
                padded_masks.append(mask + [0] * fill)
        return padded, padded_masks

    # --- decoding -------------------------------------------------------------------------------

    def decode(self, token_ids, skip_special_tokens=False, **kwargs) -> str:
        """Ids -> text. A run of byte tokens is one UTF-8 sequence (invalid parts become U+FFFD)."""
        ids = self._check_ids(_as_id_list(token_ids))
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        # Every non-byte token is valid UTF-8, so decoding all bytes at once equals decoding
        # each byte run on its own (with "replace", an unfinished run ends where valid text starts).
        table = self._id_bytes
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def batch_decode(self, sequences, skip_special_tokens=False, **kwargs) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            return ids
        low, high = min(ids), max(ids)
        if low < 0 or high >= len(self.ids_to_tokens):
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range [0, {len(self.ids_to_tokens)})")
        return ids

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"do_clean_text={self.do_clean_text}, padding_side={self.padding_side!r}, "
            f"compiled={self._c_scanner is not None})"
        )


def _is_int(x) -> bool:
    """An int, or a scalar integer of another library (numpy's int64, ...), but not a bool."""
    return not isinstance(x, bool) and hasattr(x, "__index__") and getattr(x, "ndim", 0) == 0


def _truncation_on(truncation, max_length, padding) -> bool:
    """transformers' rule: None truncates when max_length is given without padding; strategies by name."""
    if truncation is None:
        return max_length is not None and padding in (False, None, "do_not_pad")
    if truncation in (False, "do_not_truncate"):
        return False
    if truncation in (True, "longest_first", "only_first"):
        return True
    raise ValueError(f"unsupported truncation {truncation!r}: use True, False, 'longest_first', 'only_first' "
                     "or 'do_not_truncate'")


def _as_id_list(ids) -> list[int]:
    """Accept an int, a list/tuple of ints (numpy ints too), or a 1-D numpy array / torch tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int) and not isinstance(ids, bool):
        return [int(ids)]
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"token ids must be an int or a sequence of ints, not {type(ids).__name__}")
    if all(type(i) is int for i in ids):
        return list(ids)
    out = []
    for i in ids:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"token ids must be ints, got {i!r}")
        out.append(operator.index(i))
    return out


def _to_tensor(rows, kind):
    if kind == "np":
        import numpy as np

        return np.asarray(rows, dtype=np.int64)
    if kind == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long)
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', not {kind!r}")
