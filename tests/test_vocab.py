"""The demo SentencePiece vocabulary: the shipped file and how it is built."""

from imagen_jax.data import captions
from imagen_jax.text import vocab as vocab_lib


def test_every_grammar_word_is_one_piece():
  vocab = vocab_lib.load_vocabulary("default")
  for word in captions.grammar_stems():
    pieces = vocab.tokenizer.encode(word, out_type=str)
    assert pieces == ["\u2581" + word], (word, pieces)
  for shape in captions.SHAPES:
    pieces = vocab.tokenizer.encode(captions.plural(shape), out_type=str)
    assert pieces == ["\u2581" + shape, "s"], pieces
  # Inside a caption too, and other English still tokenizes.
  caption = captions.relation_caption(("green", "circle"), "to the left of",
                                      ("cyan", "square"))
  assert len(vocab.encode(caption)) == len(caption.split())
  ids = vocab.encode("greenery")
  assert vocab.decode(ids) == "greenery" and len(ids) > 1


def test_shipped_vocabulary_is_what_build_vocab_writes(tmp_path):
  out = str(tmp_path / "demo.model")
  vocab_lib.build_vocab(out)
  assert vocab_lib.vocab_sha256(out) == vocab_lib.vocab_sha256("default")
  assert vocab_lib.load_vocabulary(out).vocab_size == vocab_lib.DEMO_VOCAB_SIZE
