"""A model vocabulary padded past the tokenizer's (issue 14, item 2): generation never yields an id the
tokenizer lacks when it is told the limit (`generate(..., vocab_limit=len(tokenizer))`, which the CLI does)."""

from __future__ import annotations

import pytest
import torch

from neoxja import generate_cli
from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.model import GPTNeoXJapaneseForCausalLM
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

PADDED = 8192  # the bundled tokenizer has 8000 ids


def padded_model(tokenizer_len: int) -> GPTNeoXJapaneseForCausalLM:
    """Random tiny model whose output layer favours the ids past the tokenizer: rows < tokenizer_len are zero,
    so their logits are 0 and the largest of the 192 random logits above them wins greedy decoding."""
    torch.manual_seed(0)
    cfg = GPTNeoXJapaneseConfig(vocab_size=PADDED, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=7996,
                                eos_token_id=7999)
    model = GPTNeoXJapaneseForCausalLM(cfg).eval()
    with torch.no_grad():
        model.embed_out.weight[:tokenizer_len] = 0
        model.embed_out.weight[tokenizer_len:].normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory, bundled_dir):
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(bundled_dir)
    assert len(tok) == 8000
    out = tmp_path_factory.mktemp("padded")
    padded_model(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_generate_masks_ids_at_and_past_vocab_limit():
    model = padded_model(8000)
    ids = torch.tensor([[10, 11, 12]])
    plain = model.generate(ids, max_new_tokens=5)
    assert bool((plain[:, 3:] >= 8000).all())  # generate() alone masks nothing (documented)
    limited = model.generate(ids, max_new_tokens=5, vocab_limit=8000)
    assert bool((limited[:, 3:] < 8000).all())
    sampled = model.generate(ids, max_new_tokens=20, vocab_limit=8000, do_sample=True, top_k=0,
                             generator=torch.Generator().manual_seed(0))
    assert bool((sampled[:, 3:] < 8000).all())
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="vocab_limit"):
            model.generate(ids, max_new_tokens=1, vocab_limit=bad)


def test_cli_never_emits_an_id_the_tokenizer_lacks(padded_dir, capsys):
    # before the fix: "token id 8xxx is out of range [0, 8000)" part-way through the output
    code = generate_cli.main(["吾輩は猫", "--model", str(padded_dir), "--greedy", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("吾輩は猫")


def test_num_beams_above_one_says_beam_search_is_not_implemented():
    # before: TypeError: generate() got an unexpected keyword argument 'num_beams'
    model = padded_model(8000)
    with pytest.raises(NotImplementedError, match="beam search is not implemented"):
        model.generate(torch.tensor([[10, 11]]), max_new_tokens=2, num_beams=4)
    assert model.generate(torch.tensor([[10, 11]]), max_new_tokens=2, num_beams=1).shape == (1, 4)


def test_num_beams_deviation_transformers_runs_beam_search(tmp_path):
    transformers = pytest.importorskip("transformers")
    padded_model(8000).save_pretrained(tmp_path)
    ref = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).eval()
    out = ref.generate(torch.tensor([[10, 11]]), max_new_tokens=2, num_beams=2, do_sample=False)
    assert out.shape == (1, 4)  # transformers searches beams; neoxja refuses (README table)
