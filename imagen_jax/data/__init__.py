"""Input pipelines: readers, preprocessing and the built-in datasets."""
