"""Text side: vocabularies, seqio caption Tasks, T5 loading, embedding store."""
