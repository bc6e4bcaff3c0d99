"""The loss mask and the prompt/completion boundary, token by token."""
import pytest

from ftpipe.training.basemodel import build_tokenizer
from ftpipe.training.batches import IGNORE_INDEX, collate, encode
from ftpipe.data.formatting import prompt_of


@pytest.fixture(scope="module")
def tok():
    corpus = ["On March 13, 1991 the council met.", "The log 1991-03-13 was filed."] * 50
    return build_tokenizer(corpus, vocab_size=300)


ROW = {"instruction": "Convert 1991-03-13 to words.", "input": "", "output": "March 13, 1991"}


def test_prompt_has_no_trailing_space():
    assert prompt_of(ROW).endswith("### Response:")
    assert "### Input:" in prompt_of(ROW | {"input": "x"})


def test_completion_only_masks_every_prompt_token(tok):
    ids, labels = encode(tok, ROW, 256, completion_only=True)
    n_prompt = len(tok(prompt_of(ROW))["input_ids"])
    assert ids[0] == tok.bos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == " March 13, 1991"
    # digits are single tokens: the year is four tokens
    assert [t for t in tok.convert_ids_to_tokens(ids[-5:-1])] == ["1", "9", "9", "1"]


def test_full_loss_when_switched_off(tok):
    ids, labels = encode(tok, ROW, 256, completion_only=False)
    assert labels == ids


def test_collate_pads_right_and_masks_padding(tok):
    a = encode(tok, ROW, 256)
    b = encode(tok, ROW | {"instruction": "Hi"}, 256)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(a[0]), len(b[0]))
    short = 1 if len(b[0]) < len(a[0]) else 0
    n = len((a, b)[short][0])
    assert batch["attention_mask"][short, n:].sum() == 0
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
