"""SentencePiece vocabularies: loading, hashing, and the project's own small one.

Real use points at T5's ``cc_all.32000`` SentencePiece model (``sentencepiece
.model`` in t5x, ``spiece.model`` in Hugging Face checkpoints). For tests and
the embedded default the package ships ``assets/imagen_demo_spm.model``, a
1024-piece unigram model trained by ``python -m imagen_jax.text.vocab`` on the
built-in datasets' caption grammar plus general English (Python's own
documentation text), with T5's special ids: pad 0, eos 1, unk 2, no bos.
Every word of the grammar is one piece (plurals: stem + "s").
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
from typing import TYPE_CHECKING

from imagen_jax import fileio

if TYPE_CHECKING:
  import seqio

DEMO_VOCAB_SIZE = 1024
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def default_vocab_path() -> str:
  """Path of the small SentencePiece model shipped with the package."""
  return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                      "imagen_demo_spm.model")


def load_vocabulary(path: str, extra_ids: int = 0
                    ) -> seqio.SentencePieceVocabulary:
  """Loads a SentencePiece model as a seqio vocabulary.

  Args:
    path: the ``.model`` file ("default" for the shipped demo vocabulary).
    extra_ids: sentinel ids appended after the pieces (T5 uses 100 for its
      span-corruption objective; an encoder fed captions needs none).

  Returns:
    A ``seqio.SentencePieceVocabulary``.
  """
  path = default_vocab_path() if path in ("", "default") else path
  if not fileio.isfile(path):
    raise FileNotFoundError(
        f"SentencePiece vocabulary {path!r} does not exist; pass the T5 "
        "sentencepiece .model file (or 'default' for the demo vocabulary).")
  # Imported here: seqio imports TensorFlow, whose start-up log lines would
  # otherwise come before every CLI's one-line error, whether or not it
  # tokenizes anything.
  import seqio  # pylint: disable=g-import-not-at-top
  # seqio opens the model through tf.io.gfile, lazily: give it a local copy
  # that lives as long as the process.
  vocab = seqio.SentencePieceVocabulary(fileio.cached_local_copy(path),
                                        extra_ids=extra_ids)
  try:
    vocab.tokenizer  # parses the file now, so a bad file fails here
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a SentencePiece model ({e}); pass the "
                     "T5 sentencepiece .model file.") from None
  return vocab


def vocab_sha256(path: str) -> str:
  """SHA-256 of a vocabulary file: identifies it across machines."""
  path = default_vocab_path() if path in ("", "default") else path
  return hashlib.sha256(fileio.read_bytes(path)).hexdigest()


def _demo_corpus(seed: int = 0) -> list[str]:
  """Caption grammar of the built-in datasets plus general English."""
  from imagen_jax.data import captions  # pylint: disable=g-import-not-at-top
  rng = random.Random(seed)
  lines = captions.caption_corpus(rng, 20000)
  try:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
    text = " ".join(topics[k] for k in sorted(topics))
    lines += [ln.strip() for ln in text.splitlines() if len(ln.split()) > 3]
  except ImportError:
    pass
  return lines


def build_vocab(out_path: str, vocab_size: int = DEMO_VOCAB_SIZE,
                seed: int = 0) -> None:
  """Trains the demo SentencePiece model (deterministic, single-threaded)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import captions  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_demo_corpus(seed)), model_writer=model,
      vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      hard_vocab_limit=True, minloglevel=2,
      # One piece per word of the captions, as T5's 32k vocabulary has for
      # common English words: at 1024 pieces the unigram model alone splits
      # most colour words in two ("gre" "en"), which spreads a word's
      # identity over two positions of the frozen encoder. Plurals stay stem
      # + "s" ("square" "s"): a random-weight encoder would give a plural of
      # its own no relation to the singular. "\u2581" marks a word start, so
      # these pieces match at word starts only.
      user_defined_symbols=["\u2581" + w for w in captions.grammar_stems()])
  fileio.write_bytes(out_path, model.getvalue())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Builds the demo vocabulary.")
  parser.add_argument("--out", default=default_vocab_path())
  parser.add_argument("--vocab_size", type=int, default=DEMO_VOCAB_SIZE)
  args = parser.parse_args(argv)
  build_vocab(args.out, args.vocab_size)
  print(f"wrote {args.out} ({fileio.size(args.out)} bytes, sha256 "
        f"{vocab_sha256(args.out)[:16]}...)")


if __name__ == "__main__":
  main()
