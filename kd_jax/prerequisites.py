"""Preflight: what a run needs that it cannot make itself, checked before any heavy work.

    plan = prerequisites.check(config, workdir)   # raises MissingPrerequisites, or returns a Plan

`kd_jax.run.run` calls `check` first: before a model is built, a program compiled or a file
downloaded, it walks the stages the run will go through and either returns the `Plan` (the
stages to train, in order, each with its config: e.g. the teacher into `<workdir>/teacher`,
then the student) or raises `MissingPrerequisites` naming **every** missing item at once, each
as the `--config.key=` flag that supplies it and the command that makes it. `finished` is the
one test of "this stage is done" (its results.json).

The walk is driven by the config alone (no table of config files):

* `config.method`'s class (`kd_jax.methods.get_method`): a method that `uses_teacher` (the
  distillation methods) needs `config.teacher` -- a finished run in `teacher.workdir`, or the
  teacher config `teacher.train`, trained first into `<workdir>/teacher` (walked the same way,
  its keys named under `teacher.train.`) -- and streams `config.data.transfer`. A method that
  chains NCD stage 1 (one with `stage1_config`, while `ncd.pretrain.enabled`) needs a finished
  stage-1 run in `ncd.pretrain.workdir` or trains `stage1_config(config)` (built from
  `ncd.pretrain.train`) into `<workdir>/pretrain` first. A stage-1 run that fine-tunes only
  `ncd.trainable` of its backbone needs the pretrained weights in `ncd.backbone_workdir`.
* every stage evaluates on `config.data.target` (and trains on its `train_split` unless it
  distils from `data.transfer`); each data source is checked by its `source`: `tfds` (the
  dataset is prepared in `data_dir`, or TFDS's default / `TFDS_DATA_DIR`), `npz` / `folder`
  (`path` exists), `shards` (`pattern` matches files), `offline_mnist` / `offline_pool`
  (bundled with kd_jax: nothing to check).

Only what is certainly missing is reported: a remote path (`gs://...`) is left to the loaders
and the input pipeline, which read it (a lookup here could wait on network timeouts).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap

import ml_collections

from kd_jax import fileio

# What `kd_jax.data.shards.shard_pattern(DIR)` returns (not imported: it loads TensorFlow).
POOL_PATTERN = "DIR/pool-*-of-*.tfrecord"


@dataclasses.dataclass
class Missing:
    """One missing prerequisite: the config keys that supply it (dotted, as after `--config.`),
    what is wrong, and how to make it (command lines / hints)."""

    keys: tuple[str, ...]
    problem: str
    fix: tuple[str, ...] = ()
    value: str = "DIR"  # the placeholder shown in the flag

    def flags(self) -> str:
        return " ".join(f"--config.{k}={self.value}" for k in self.keys)

    def render(self, number: int) -> str:
        lines = [f"{number}. {self.flags()}"]
        lines += textwrap.wrap(self.problem, 96, initial_indent="   ", subsequent_indent="   ")
        for line in self.fix:  # "$ ..." lines are commands, shown whole
            if line.startswith("$ "):
                lines.append(f"     {line[2:]}")
            else:
                lines += textwrap.wrap(line, 96, initial_indent="   ", subsequent_indent="   ")
        return "\n".join(lines)


def finished(workdir: str, config: ml_collections.ConfigDict | None = None) -> bool:
    """Whether the run in `workdir` has finished: its results.json is there and, given the
    config it was asked to train, records that config's `num_steps`. Without a config (a
    teacher or stage-1 workdir named by the user, perhaps a converted checkpoint) results.json
    alone says so."""
    path = fileio.join(workdir, "results.json")
    if not fileio.exists(path):
        return False
    if config is None:
        return True
    try:
        return fileio.read_json(path).get("steps") == config.num_steps
    except (OSError, ValueError):
        return False


class MissingPrerequisites(FileNotFoundError, ValueError):
    """Raised before any heavy work when a run lacks something it cannot make itself.

    `missing` holds every item (`Missing`); the message lists them all, each with its flag and
    the command that makes it. (A FileNotFoundError for callers that caught the old missing
    teacher / dataset errors, and a ValueError: most items are unset config keys.)
    """

    def __init__(self, missing, heading: str = ""):
        self.missing = list(missing)
        n = len(self.missing)
        head = heading or (
            f"{n} prerequisite{'s' if n != 1 else ''} of this run "
            f"{'are' if n != 1 else 'is'} missing (nothing was built, trained "
            f"or downloaded); set or make each:"
        )
        super().__init__("\n".join([head] + [m.render(i + 1) for i, m in enumerate(self.missing)]))

    def keys(self) -> list[str]:
        return [k for m in self.missing for k in m.keys]


@dataclasses.dataclass
class Stage:
    """One training run of the plan: `config` trained into `workdir`. `key` is where its config
    sits in the top-level config ("" for the run asked for, e.g. "teacher.train")."""

    method: str
    workdir: str
    config: ml_collections.ConfigDict
    key: str = ""

    def __str__(self) -> str:
        where = f" (config.{self.key})" if self.key else ""
        return f"{self.method}{where}: {self.config.get('num_steps', '?')} steps in {self.workdir}"


@dataclasses.dataclass
class Plan:
    """The stages a run trains, in order; the last is the run asked for. Empty: the run in
    `workdir` has already finished."""

    stages: list[Stage]

    def describe(self) -> str:
        if not self.stages:
            return "[kd_jax] nothing to train: the run has finished"
        return "[kd_jax] plan: " + " -> ".join(str(s) for s in self.stages)


class UnfinishedPrerequisites(RuntimeError):
    """`train.train_and_evaluate` runs one stage: raised when the stages before it (a teacher,
    NCD stage 1) have not finished. `kd_jax.run.run` (and `python -m kd_jax.main`) trains them."""

    def __init__(self, plan: Plan):
        self.plan = plan
        *before, last = plan.stages
        super().__init__(
            f"{last.method} in {last.workdir} needs stages that have not finished: "
            + "; ".join(str(s) for s in before)
            + ". train.train_and_evaluate trains one stage; kd_jax.run.run(config, workdir) "
            "(what python -m kd_jax.main --config=... --workdir=... calls) trains them first."
        )


def check(config: ml_collections.ConfigDict, workdir: str, teacher_given: bool = False) -> Plan:
    """The `Plan` of this run, or `MissingPrerequisites` listing every missing item at once.
    `teacher_given`: the caller hands the method its teacher (no teacher stage, no workdir)."""
    found, missing = plan(config, workdir, teacher_given)
    if missing:
        raise MissingPrerequisites(missing)
    return found


def plan(
    config: ml_collections.ConfigDict, workdir: str, teacher_given: bool = False
) -> tuple[Plan, list[Missing]]:
    """(the stages to train, everything missing); never raises for a missing prerequisite."""
    workdir = fileio.absolute(workdir)
    stages: list[Stage] = []
    missing = _Collector()
    # A remote workdir is not looked up here: the loop reads its results.json.
    if _is_remote(workdir) or not finished(workdir, config):
        _walk(config, workdir, "", stages, missing, check_target=True, teacher_given=teacher_given)
    return Plan(stages), missing.items


# ---------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------


def _walk(config, workdir, prefix, stages, missing, check_target, teacher_given=False):
    from kd_jax import methods

    name = config.get("method", "")
    try:
        cls = methods.get_method(name)
    except ValueError as e:  # names config.method; say which stage's config holds it
        if not prefix:
            raise
        raise ValueError(f"config.{prefix[:-1]}: {e}") from None
    transfer = config.data.transfer
    streams_transfer = getattr(cls, "transfer_data", True)  # False: a generator method
    if cls.uses_teacher and not teacher_given:
        _teacher(config, workdir, prefix, stages, missing)
    ncd = config.get("ncd")
    chains_stage1 = hasattr(cls, "stage1_config") and ncd is not None
    if chains_stage1 and ncd.pretrain.get("enabled", True):
        _stage1(cls, config, workdir, prefix, stages, missing)
    if check_target:
        target = config.data.target
        splits = [target.eval_split]
        if not cls.uses_teacher or (streams_transfer and transfer.source == "original"):
            splits.insert(0, target.train_split)
        _source(target, prefix + "data.target", splits, missing)
        if ncd is not None and ncd.get("classes_file") and _exists(ncd.classes_file) is False:
            missing.add(
                Missing(
                    (prefix + "ncd.classes_file",),
                    f"config.{prefix}ncd.classes_file={ncd.classes_file!r} does not exist.",
                    (
                        "One class per line: an integer label or a class name of the dataset (e.g. a "
                        "WordNet id); or leave it empty for the config's default split.",
                    ),
                    value="FILE",
                )
            )
    if cls.uses_teacher and streams_transfer and transfer.source != "original":
        _source(transfer, prefix + "data.transfer", [transfer.get("split", "train")], missing)
    if ncd is not None and not chains_stage1:
        _backbone(config, prefix, missing)
    stages.append(Stage(name, workdir, config, prefix[:-1]))


def _teacher(config, workdir, prefix, stages, missing):
    teacher = config.teacher
    path = teacher.workdir or fileio.join(workdir, "teacher")
    # A remote teacher the user named is left to the loader; a chained one (<workdir>/teacher,
    # perhaps on gs://) is looked up, since the runner must know whether to train it.
    if (teacher.workdir and _is_remote(path)) or finished(path):
        return  # a finished (or converted) teacher, or a remote one the run will read
    train = teacher.get("train")
    if teacher.workdir or not train or not train.get("method"):
        missing.add(missing_teacher(config, workdir, prefix))
    else:
        _walk(train, path, prefix + "teacher.train.", stages, missing, check_target=True)


def missing_teacher(config, workdir: str, prefix: str = "") -> Missing:
    """The item for a teacher that is neither finished in `teacher.workdir` nor trainable
    from `teacher.train` (also raised by `kd_jax.teacher.load_teacher`, which only reads)."""
    key = prefix + "teacher.workdir"
    path = config.teacher.workdir or fileio.join(workdir, "teacher")
    trainable = bool(config.teacher.get("train") and config.teacher.train.get("method"))
    if config.teacher.workdir:
        problem = f"config.{key}={path!r} holds no finished teacher run (results.json missing)."
    elif trainable:  # reached only by a method built directly (a notebook, a test)
        problem = (
            f"{path!r} holds no finished teacher run yet: kd_jax.run.run(config, "
            f"workdir) (python -m kd_jax.main) trains config.{prefix}teacher.train "
            f"there first."
        )
    else:
        problem = (
            f"The {config.method} student needs a teacher: config.{key} is empty and "
            f"config.{prefix}teacher.train holds no teacher config to train into {path} "
            f"first."
        )
    fix = _teacher_fix(config, prefix)
    if config.teacher.workdir and trainable:
        fix += (
            f"Or leave config.{key} empty: config.{prefix}teacher.train is then trained "
            f"first into {fileio.join(workdir, 'teacher')}.",
        )
    return Missing((key,), problem, fix)


def _teacher_fix(config, prefix) -> tuple[str, ...]:
    from kd_jax import models

    arch = config.teacher.model or "ARCH"
    classes = config.num_classes
    try:
        description = models.model_description(arch)
    except (KeyError, ValueError):
        description = ""
    convert = (
        f"$ python -m kd_jax.tools.convert_torch --arch={arch} --num_classes={classes} "
        f"--src={arch}.pth --out=DIR"
    )
    if description.startswith("torchvision") and classes == 1000:
        return (
            f"DIR: torchvision's ImageNet {arch} converted (torch and torchvision needed, "
            f"CPU wheels are enough):",
            f'$ python -c "import torch, torchvision; torch.save(torchvision.models.{arch}('
            f"weights='IMAGENET1K_V1').state_dict(), '{arch}.pth')\"",
            convert,
            f"(also set --config.{prefix}teacher.model if DIR holds another architecture)",
        )
    what = f"a PyTorch {description}" if description else "a PyTorch teacher"
    return (
        f"DIR: a finished kd_jax `teacher` run (python -m kd_jax.main "
        f"--config=configs/teacher_*.py --workdir=DIR), or {what} state dict converted:",
        convert,
    )


def _stage1(cls, config, workdir, prefix, stages, missing):
    pre = config.ncd.pretrain
    path = pre.workdir or fileio.join(workdir, "pretrain")
    if (pre.workdir and _is_remote(path)) or finished(path):  # as for the teacher
        return
    key = prefix + "ncd.pretrain.workdir"
    fix = (
        "DIR: a finished stage-1 run of this config's `pretrain` argument "
        "(python -m kd_jax.main --config=configs/<this config>.py:pretrain --workdir=DIR).",
    )
    if pre.workdir:
        missing.add(
            Missing(
                (key,),
                f"config.{key}={path!r} holds no finished ncd_pretrain run (results.json missing).",
                fix,
            )
        )
    elif not pre.get("train") or not pre.train.get("method"):
        missing.add(
            Missing(
                (key,),
                f"The {config.method} run starts from NCD stage 1: "
                f"config.{key} is empty and config.{prefix}ncd.pretrain.train holds "
                f"no stage-1 config to train into {path} first.",
                fix,
            )
        )
    else:
        # Stage 1 runs on this run's dataset and class split (the method's own rule), so its
        # target is the one this stage checks: not checked twice, nor named under its key.
        stage1 = cls.stage1_config(config)
        _walk(stage1, path, prefix + "ncd.pretrain.train.", stages, missing, check_target=False)


def _backbone(config, prefix, missing):
    from kd_jax import models

    ncd = config.ncd
    key = prefix + "ncd.backbone_workdir"
    arch = config.model.name
    try:
        description = models.model_description(arch)
    except (KeyError, ValueError):
        description = arch
    if "DINO" in description:  # a headless backbone: DINO's self-supervised weights
        fix = (
            f"DIR: DINO's released {arch} backbone converted (its checkpoint from the DINO "
            f"repository, e.g. dino_vitbase16_pretrain.pth for ViT-B/16; torch needed, the "
            f"CPU wheel is enough):",
            f"$ python -m kd_jax.tools.convert_torch --arch={arch} --num_classes=0 "
            f"--src=DINO_CHECKPOINT.pth --out=DIR",
        )
    else:
        fix = (
            f"DIR: pretrained {description} weights converted:",
            f"$ python -m kd_jax.tools.convert_torch --arch={arch} --num_classes=N "
            f"--src=WEIGHTS.pth --out=DIR",
        )
    if ncd.get("backbone_workdir"):
        if _exists(fileio.join(ncd.backbone_workdir, "checkpoints")) is False:
            missing.add(
                Missing(
                    (key,),
                    f"config.{key}={ncd.backbone_workdir!r} holds no "
                    f"checkpoint (checkpoints/ missing).",
                    fix,
                )
            )
    elif ncd.get("trainable"):
        missing.add(
            Missing(
                (key,),
                f"config.{prefix}ncd.trainable={tuple(ncd.trainable)} fine-tunes only part "
                f"of the {config.model.name} backbone, so it must start from pretrained "
                f"weights: config.{key} is empty.",
                fix
                + (
                    f"(Or --config.{prefix}ncd.trainable=() trains the whole backbone from "
                    f"scratch.)",
                ),
            )
        )


# ---------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------


def _source(spec, key, splits, missing):
    kind = spec.get("source", "")
    if kind == "tfds":
        _tfds(spec, key, splits[0], missing)
    elif kind == "shards":
        pattern = spec.get("pattern", "")
        fix = (
            "DIR: the pool written once from an image folder (searched recursively) or an "
            ".npz of uint8 `images` [N,H,W(,C)]:",
            "$ python -m kd_jax.data.make_shards --src=IMAGES --out=DIR --num_shards=256",
        )
        value = f"'{POOL_PATTERN}'"
        if not pattern:
            missing.add(
                Missing(
                    (key + ".pattern",),
                    f"config.{key}.source='shards' reads an "
                    f"open-world pool of TFRecord shards, but config.{key}.pattern "
                    f"is empty.",
                    fix,
                    value,
                )
            )
        elif _glob(pattern) == []:
            missing.add(
                Missing(
                    (key + ".pattern",),
                    f"config.{key}.pattern={pattern!r} matches no file.",
                    fix,
                    value,
                )
            )
    elif kind == "npz":
        path = spec.get("path", "")
        paths = [path.format(split=s) if "{split}" in path else path for s in splits]
        fix = (
            "An .npz with uint8 `images` [N,H,W(,C)] and optional `labels` [N] "
            "(`{split}` in the path is replaced by the split name).",
        )
        if not path:
            missing.add(
                Missing(
                    (key + ".path",),
                    f"config.{key}.source='npz' but config.{key}.path is empty.",
                    fix,
                    "FILE.npz",
                )
            )
        for p in sorted(set(paths)) if path else ():
            if _exists(p) is False:
                missing.add(
                    Missing(
                        (key + ".path",),
                        f"config.{key}.path: {p!r} does not exist.",
                        fix,
                        "FILE.npz",
                    )
                )
    elif kind == "folder":
        path = spec.get("path", "")
        layout = "/".join(
            ["DIR", "{" + ",".join(dict.fromkeys(splits)) + "}", "<class>", "<image files>"]
        )
        fix = (f"An image folder laid out as {layout} (sorted class folder names = labels).",)
        if not path:
            missing.add(
                Missing(
                    (key + ".path",),
                    f"config.{key}.source='folder' but config.{key}.path is empty.",
                    fix,
                )
            )
        else:
            absent = [s for s in dict.fromkeys(splits) if _exists(fileio.join(path, s)) is False]
            if absent:
                missing.add(
                    Missing(
                        (key + ".path",),
                        f"config.{key}.path={path!r} has no split folder {absent}.",
                        fix,
                    )
                )
    # offline_mnist / offline_pool are bundled; an unknown source is named by the pipeline.


def _tfds(spec, key, split, missing):
    name = spec.get("name", "")
    if not name:
        missing.add(
            Missing(
                (key + ".name",),
                f"config.{key}.source='tfds' but config.{key}.name is empty.",
                value="NAME",
            )
        )
        return
    data_dir = spec.get("data_dir") or None  # None: TFDS_DATA_DIR or ~/tensorflow_datasets
    if _is_remote(data_dir or os.environ.get("TFDS_DATA_DIR", "")):
        return  # e.g. gs://: read (and its absence reported) by the pipeline
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 -- tfds raises DatasetNotFoundError (a ValueError), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        missing.add(
            Missing(
                (key + ".name",),
                f"config.{key}.name={name!r} is not a TFDS dataset ({first}).",
                value="NAME",
            )
        )
        return
    if _tfds_prepared(builder, split):
        return
    root = os.fspath(builder.data_dir_root)
    manual = getattr(type(builder), "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    build = f"$ tfds build {name} --data_dir={root}"
    if manual:
        fix = (
            "It needs a manual download: " + " ".join(str(manual).split()),
            f"$ tfds build {name} --data_dir={root} --manual_dir=MANUAL_DIR",
            f"(MANUAL_DIR defaults to {root}/downloads/manual)",
        )
    else:
        fix = (build,)
    fix += (
        "Or point the flag above at a data dir where it is prepared (TFDS_DATA_DIR=DIR "
        "is the default of every empty data_dir).",
    )
    missing.add(
        Missing(
            (key + ".data_dir",),
            f"TFDS dataset {name!r} ({builder.version}) is not prepared in {root}.",
            fix,
        ),
        merge=("tfds", name, root),
    )


def _tfds_prepared(builder, split) -> bool:
    try:
        if (builder.data_path / "dataset_info.json").exists():
            return True
    except Exception:  # noqa: BLE001 -- e.g. an unreachable remote data_dir: the pipeline says
        return True
    # Not on disk: the call the pipeline makes decides (it is what tfds.testing.mock_data
    # replaces, so tests on mock data pass here as they do there).
    try:
        builder.as_dataset(split=split, shuffle_files=False)
    except Exception:  # noqa: BLE001 -- AssertionError "could not find data", ...
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class _Collector:
    """Missing items in order; items with the same `merge` key become one naming all keys
    (e.g. one TFDS dataset read by the teacher stage and by the student)."""

    def __init__(self):
        self.items: list[Missing] = []
        self._merged: dict = {}

    def add(self, item: Missing, merge=None) -> None:
        if merge is not None and merge in self._merged:
            known = self._merged[merge]
            keys = dict.fromkeys(known.keys + item.keys)  # the top-level key first
            known.keys = tuple(sorted(keys, key=lambda k: k.count(".")))
            return
        if merge is not None:
            self._merged[merge] = item
        self.items.append(item)


_is_remote = fileio.is_remote


def _exists(path: str) -> bool | None:
    """True / False, or None for a remote path (left to the code that reads it)."""
    return None if _is_remote(path) else fileio.exists(path)


def _glob(pattern: str) -> list[str] | None:
    return None if _is_remote(pattern) else fileio.glob(pattern)
