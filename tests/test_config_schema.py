"""The config schema: one declaration per field, checked when a config loads."""

import dataclasses
import functools
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from imagen_jax import build
from imagen_jax import cascade as cascade_lib
from imagen_jax import config_defaults as cd
from imagen_jax import sample as sample_cli
from imagen_jax.models.unet import UNet
from tests import helpers

# Variant names the config files take (an unknown one raises ValueError).
VARIANTS = ("", "paper", "cpu", "tiny") + cd.DEMO_VARIANTS


@functools.lru_cache(maxsize=None)
def _config_names():
  """(file, variant) for every config file in configs/ and its variants."""
  out = []
  for path in sorted(glob.glob(os.path.join(helpers.ROOT, "configs", "*.py"))):
    name = os.path.splitext(os.path.basename(path))[0]
    seen = set()
    for variant in VARIANTS:
      try:
        config = helpers.load_config(name, variant)
      except ValueError:
        continue
      if config.to_json_best_effort() not in seen:  # files ignoring the arg
        seen.add(config.to_json_best_effort())
        out.append((name, variant))
  return tuple(out)


def _all_configs():
  return [(f"{n}:{v}", helpers.load_config(n, v)) for n, v in _config_names()]


def _leaves(schema, prefix=()):
  for name, spec in schema.items():
    if isinstance(spec, dict):
      yield from _leaves(spec, prefix + (name,))
    else:
      yield prefix + (name,), spec


def _wrong_type(spec):
  """A value of another type than the field's."""
  if spec.kind is str:
    return 7
  if spec.kind is tuple:
    return "7"
  if spec.kind is bool:
    return "yes"
  if spec.kind is int:
    return 1.5
  return "1.5"


def _out_of_range(spec):
  """A value of the right type the field refuses, or None if it takes any."""
  allowed = spec.allowed()
  kind = spec.item_kind if spec.kind is tuple else spec.kind
  if spec.syntax is not None:
    bad = "not-a-valid-value"
  elif allowed is not None:
    bad = "not-a-choice" if kind is str else max(allowed) + 1
  elif spec.min is not None:
    bad = kind(spec.min - 1)
  elif spec.above is not None:
    bad = kind(spec.above)
  elif spec.max is not None:
    bad = kind(spec.max + 1)
  else:
    return None
  return tuple([bad] * len(spec.default)) if spec.kind is tuple else bad


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree[p]
  old = tree[path[-1]]
  tree[path[-1]] = value
  return old


@pytest.mark.parametrize("override,field,accepts", [
    ("batch_size=-4", "batch_size", "an integer >= 1"),
    ("diffusion.prediction=foo", "diffusion.prediction", "one of eps, x0, v"),
    ("model.dtype=float8", "model.dtype", "one of float32, bfloat16"),
    ("data.source=nope", "data.source", "one of synthetic, tfds"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate", "a number > 0"),
])
def test_new_user_mistakes_are_one_line_exit_2(tmp_path, override, field,
                                               accepts):
  """The issue's five cases on configs/tiny.py: one line, exit 2, no workdir."""
  proc = helpers.run_cli("imagen_jax.train.main", "--config=configs/tiny.py",
                         f"--workdir={tmp_path}/run", f"--config.{override}",
                         timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(f"imagen-train: config.{field}="), lines[0]
  assert accepts in lines[0], lines[0]
  assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("module,config,override,message", [
    ("imagen_jax.train.main", "configs/tiny.py", "model.num_groups=7",
     "imagen-train: config.model does not build a U-Net: GroupNorm: 16 "
     "channels are not divisible into 7 groups"),
    ("imagen_jax.train.main", "configs/tiny.py", "model.num_res_blocks=1,1,1",
     "imagen-train: config.model does not build a U-Net: num_res_blocks has 3 "
     "entries but channel_mult has 2 levels"),
    ("imagen_jax.demo", "configs/demo.py:quick", "sr.model.channel_mult=1,2,3",
     "imagen-demo: config.sr.model does not build a U-Net:"),
])
def test_fields_that_do_not_fit_together_are_one_line_exit_2(
    tmp_path, module, config, override, message):
  """Each field passes the schema; together they build no U-Net."""
  proc = helpers.run_cli(module, f"--config={config}",
                         f"--workdir={tmp_path}/run", f"--config.{override}",
                         timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(message), lines[0]
  assert not (tmp_path / "run").exists()  # refused before any work


def test_every_config_is_valid_and_every_field_is_checked():
  """Each field of each config, with a wrong type and an out-of-range value."""
  checked = 0
  for name, config in _all_configs():
    cd.validate(config)
    tree = config.to_dict()
    schema = cd.schema_for(config)
    for path, spec in _leaves(schema):
      dotted = ".".join(path)
      for bad in (_wrong_type(spec), _out_of_range(spec)):
        if bad is None:
          continue
        old = _set(tree, path, bad)
        with pytest.raises(cd.ConfigError, match=rf"config\.{dotted}=") as e:
          cd.validate(tree, schema)
        what = (spec.syntax(bad) if spec.syntax and isinstance(bad, str)
                else spec.accepts())
        assert what in str(e.value), (name, str(e.value))
        _set(tree, path, old)
        checked += 1
    cd.validate(tree, schema)  # everything restored
  assert {n for n, _ in _config_names()} >= {"tiny", "base64", "sr256",
                                            "sr1024", "demo"}
  assert len(_config_names()) >= 13
  assert checked > 13 * 100


def test_numeric_fields_declare_a_range():
  """Only seeds take any integer; every other number has a bound."""
  for path, spec in _leaves(cd.demo_schema()):
    kind = spec.item_kind if spec.kind is tuple else spec.kind
    if kind in (int, float) and "seed" not in path[-1]:
      assert _out_of_range(spec) is not None, path


def test_config_read_back_from_json_is_valid():
  """Workdirs store configs as JSON (tuples become lists): still valid."""
  for _, config in _all_configs():
    cd.validate(json.loads(config.to_json_best_effort()))


def test_unknown_and_missing_keys():
  config = helpers.load_config("tiny", "")
  tree = config.to_dict()
  tree["model"]["kernel"] = "auto"
  with pytest.raises(cd.ConfigError, match=r"config\.model\.kernel is not a "
                     "known field.*config_defaults.py"):
    cd.validate(tree)
  del tree["model"]["kernel"]
  del tree["optimizer"]["b2"]
  with pytest.raises(cd.ConfigError, match=r"config\.optimizer\.b2 is missing"):
    cd.validate(tree)


def test_model_fields_are_unet_fields():
  """The UNet is built from every declared model field and nothing else, so
  its own attribute defaults never decide a run's model."""
  unet_fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
  assert set(cd.MODEL) == unet_fields
  model = cd.model_defaults()
  unet = build.build_unet(model)
  for name in cd.MODEL:
    assert getattr(unet, name) == build.unet_kwargs(model)[name]
  assert unet.dtype == "bfloat16" and unet.num_res_blocks == (2, 2, 2, 2)
  # The module's own defaults are the schema's too.
  bare = UNet()
  for name, spec in cd.MODEL.items():
    assert getattr(bare, name) == spec.default, name


def test_diffusion_fields_are_stage_fields():
  """Stage takes every declared diffusion field, with its declared default,
  and builds them from a config without a hand copy."""
  from imagen_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
  fields = {f.name: f for f in dataclasses.fields(stage_lib.Stage)}
  assert set(cd.DIFFUSION) <= set(fields)
  assert set(fields) - set(cd.DIFFUSION) == {
      "unet", "resolution", "lowres_resolution", "train_crop"}
  for name, spec in cd.DIFFUSION.items():
    assert fields[name].default == spec.default, name
  config = helpers.tiny_train_config()
  config.diffusion.min_snr_gamma = 2.5
  config.diffusion.weighting = "min_snr"
  stage = stage_lib.Stage.from_config(config)
  for name in cd.DIFFUSION:
    assert getattr(stage, name) == config.diffusion[name], name


def test_sampling_defaults_agree():
  assert cd.StageSettings.from_config(cd.sample_defaults()) == cd.StageSettings()
  assert cd.StageSettings().guidance_scale == cd.base().sample.guidance_scale
  settings = cascade_lib.resolve_settings([cd.base()], {})
  assert settings == [cd.StageSettings()]


def test_a_field_added_in_one_place_is_seen_everywhere(monkeypatch):
  """A model field and a sampling setting, each declared in one line."""
  monkeypatch.setitem(cd.MODEL, "new_knob", cd.Field(3, "a test knob", min=0))
  config = cd.base()
  assert config.model.new_knob == 3
  assert build.unet_kwargs(config.model)["new_knob"] == 3
  config.model.new_knob = -1
  with pytest.raises(cd.ConfigError, match=r"config\.model\.new_knob=-1 .*>= 0"):
    cd.validate(config)
  # The UNet takes it as an attribute with its default, with no second
  # declaration: a fresh process in which the field is declared before the
  # model code is imported.
  code = textwrap.dedent("""
      from imagen_jax import config_defaults as cd
      cd.MODEL["new_knob"] = cd.Field(3, "a test knob", min=0)
      from imagen_jax import build
      from imagen_jax.models.unet import UNet
      config = cd.base()
      assert UNet().new_knob == 3
      config.model.new_knob = 5
      assert build.build_unet(config.model).new_knob == 5
      print("seen by the UNet")
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300, cwd=helpers.ROOT,
                        stdin=subprocess.DEVNULL)
  assert "seen by the UNet" in proc.stdout, proc.stderr[-2000:]

  extended = dataclasses.make_dataclass(
      "StageSettings",
      [("new_knob", float, cd.setting(0.5, "a test setting", min=0.0,
                                      max=1.0))],
      bases=(cd.StageSettings,), frozen=True)
  monkeypatch.setattr(cd, "StageSettings", extended)
  config = cd.base()
  assert config.sample.new_knob == 0.5                          # config
  cd.validate(config)
  config.sample.new_knob = 2.0
  with pytest.raises(cd.ConfigError, match=r"config\.sample\.new_knob=2\.0"):
    cd.validate(config)
  assert sample_cli.parse_overrides(["--config.new_knob=0.25"]) == {  # flags
      "new_knob": "0.25"}
  assert "new_knob" in sample_cli.setting_help()
  config.sample.new_knob = 0.75
  got = cascade_lib.resolve_settings([config, cd.base()],      # cascade
                                     {"new_knob": ",0.25"})
  assert [s.new_knob for s in got] == [0.75, 0.25]
  with pytest.raises(cascade_lib.CascadeError, match="new_knob"):
    cascade_lib.resolve_settings([config], {"new_knob": "3"})


def test_field_parse_and_words():
  f = cd.Field((1, -1, 1), min=-1, length=3)
  assert f.parse("x", "2,-1,1") == (2, -1, 1)
  assert f.accepts() == "a tuple of 3 integers >= -1"
  with pytest.raises(cd.ConfigError, match="a tuple of 3 integers"):
    f.parse("x", "2,1")
  assert cd.Field(True).parse("x", "no") is False
  with pytest.raises(cd.ConfigError, match="true or false"):
    cd.Field(True).parse("x", "maybe")
  assert cd.Field(0.5, min=0.0).parse("x", "1") == 1.0
  with pytest.raises(cd.ConfigError, match="a number >= 0"):
    cd.Field(0.5, min=0.0).parse("x", "nan")


def test_timesteps_are_checked_when_a_config_loads():
  """A respacing is checked at load (its grammar, and the schedule it needs),
  in a training config and in each stage of the demo's."""
  config = helpers.load_config("tiny", "")
  config.diffusion.schedule = "discrete_cosine"
  config.sample.timesteps = "smart27"
  cd.validate(config)
  config.sample.timesteps = "smart9"
  with pytest.raises(cd.ConfigError, match=r"^config\.sample\.timesteps="
                     r"'smart9' is invalid: Unknown respacing 'smart9'"):
    cd.validate(config)
  config.sample.timesteps = "steps:999,500,0"
  cd.validate(config)
  config.diffusion.schedule = "cosine"
  with pytest.raises(cd.ConfigError, match=r"^config\.sample\.timesteps="
                     r"'steps:999,500,0' respaces the discrete_cosine "
                     r"schedule, but diffusion\.schedule is 'cosine'"):
    cd.validate(config)
  demo = helpers.load_config("demo", "")
  demo.sr.sample.timesteps = "fast27"
  with pytest.raises(cd.ConfigError, match=r"^config\.sr\.sample\.timesteps"):
    cd.validate(demo)


def test_new_user_timesteps_mistake_is_one_line_exit_2(tmp_path):
  proc = helpers.run_cli("imagen_jax.train.main", "--config=configs/tiny.py",
                         f"--workdir={tmp_path}/run",
                         "--config.sample.timesteps=smart27", timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and "respaces the discrete_cosine" in lines[0], lines
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,text,stages,want", [
    ("num_steps", "50", 2, ["50"]),
    ("num_steps", "50,25", 2, ["50", "25"]),
    ("num_steps", "50;25", 2, ["50", "25"]),
    ("num_steps", ",25", 2, ["", "25"]),
    ("timesteps", "smart27,smart50", 2, ["smart27", "smart50"]),
    ("timesteps", "steps:999,500,0", 2, ["steps:999,500,0"]),
    ("timesteps", "steps:999,500,0", 3, ["steps:999,500,0"]),
    ("timesteps", "10,10,3,2,2", 5, ["10,10,3,2,2"]),
    ("timesteps", "10,10,3,2,2;smart50", 2, ["10,10,3,2,2", "smart50"]),
    ("timesteps", "steps:999,500,0;", 2, ["steps:999,500,0", ""]),
])
def test_stage_values_keep_values_with_commas_whole(name, text, stages, want):
  """Commas separate stages except inside one valid value (a respacing's
  sections or step list); ';' always separates them."""
  assert cd.stage_values(name, text) == want
  configs = []
  for _ in range(stages):
    config = cd.base()
    config.diffusion.schedule = "discrete_cosine"
    configs.append(config)
  got = cascade_lib.resolve_settings(configs, {name: text})
  default = getattr(cd.StageSettings(), name)
  expect = [want[0] if len(want) == 1 else want[i] for i in range(stages)]
  assert [getattr(s, name) for s in got] == [
      cd.StageSettings.fields()[name].parse(name, w) if w else default
      for w in expect]
  assert sample_cli.parse_overrides([f"--config.{name}={text}"]) == {
      name: text}


def test_sample_flags_outside_the_settings_are_checked():
  for flag, value in (("use_ema", "maybe"), ("mesh_shape", "1,2"),
                      ("kernels", "tpu")):
    with pytest.raises(SystemExit) as e:
      sample_cli.parse_overrides([f"--config.{flag}={value}"])
    assert e.value.code == 2
  assert sample_cli.parse_overrides(["--config.use_ema=false"]) == {
      "use_ema": "false"}
