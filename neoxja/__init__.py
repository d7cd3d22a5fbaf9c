"""neoxja: a standalone implementation of GPT-NeoX-Japanese.

Public names are resolved lazily (PEP 562), so `import neoxja` stays cheap and the
tokenizer can be used without importing torch.
"""

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "GPTNeoXJapaneseTokenizer": "neoxja.tokenizer",
    "GPTNeoXJapaneseConfig": "neoxja.config",
    "GPTNeoXJapaneseModel": "neoxja.model",
    "GPTNeoXJapaneseForCausalLM": "neoxja.model",
    "TextStreamer": "neoxja.streaming",
    "TextIteratorStreamer": "neoxja.streaming",
    "quantize": "neoxja.quantization",
    "export": "neoxja.exporters",
    "preferred_dtype": "neoxja.hardware",
    "choose_linear_kernels": "neoxja.kernels",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'neoxja' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return __all__
