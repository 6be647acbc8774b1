"""A trained two-stage cascade for the tests: the quick demo, run once.

Several test modules (cascade, sample CLI, notebook, demo) need real
checkpoints of a base and an SR stage that chain. The quick demo variant
makes exactly that (8 px base, 8 -> 32 px SR, tiny random T5) in about a
minute; it runs once per test session, shared by pytest-xdist workers
through a file lock in the session's common temp directory.
"""

import os

from filelock import FileLock

from tests import helpers


def quick_demo_workdir(tmp_path_factory) -> str:
  """Path of a finished quick-demo workdir (DIR/base, DIR/sr, DIR/report.json)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers
  workdir = str(root / "quick_demo")
  with FileLock(str(root / "quick_demo.lock")):
    if not os.path.exists(os.path.join(workdir, "report.json")):
      from imagen_jax import demo  # pylint: disable=g-import-not-at-top
      config = helpers.load_config("demo", "quick")
      config.data.data_dir = str(root / "tfds")
      demo.run(config, workdir, progress=False)
  return workdir
