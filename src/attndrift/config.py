"""Typed run configuration: pydantic models that reject what they do not know.

YAML is only the file format. `load_config` reads a file, applies ``key=value`` overrides
(dotted keys, values parsed as YAML) and validates; any problem raises `ConfigError` whose
message is one line naming the field and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from attndrift.fields import REFERENCE_HEADER as REFERENCE_HEADER  # re-exported
from attndrift.fields import Roles, role
from attndrift.guard import GuardConfig, check_measured
from attndrift.methods import METHODS, REGULARIZERS
from attndrift.pathsafe import check_name
from attndrift.trackers import TRACKERS
from attndrift.yamlio import YamlError, looks_numeric, parse_yaml, shorten


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is a one-line message for the user."""


class _Strict(BaseModel):
    # strict: "1e-4" (a string) is not silently turned into a number; NaN/inf are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class LoraConfig(_Strict):
    r: PosInt = Field(8, description="LoRA rank")
    alpha: PosFloat = Field(16.0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: Fraction = Field(0.05, description="dropout on the LoRA input")
    targets: list[Literal["q_proj", "k_proj", "v_proj", "out_proj"]] = Field(
        ["q_proj", "v_proj"], min_length=1, description="vision attention projections to adapt")
    train_projection: bool = Field(
        True, json_schema_extra=role("method", omit_default=True),
        description="the visual projection trains as a full tensor (the study's LoRA); false: "
                    "frozen (the later protocol's reference)")


class TrainConfig(_Strict):
    epochs: PosInt = Field(3, description="passes over the training split")
    max_steps: PosInt | None = Field(None, description="stop after this many steps (None: all)")
    batch_size: PosInt = Field(64, description="training images per step")
    lr: PosFloat = Field(1e-5, description="peak learning rate")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.01, description="AdamW weight decay")
    warmup_frac: Fraction = Field(0.05, description="linear warmup share of all steps, then cosine")
    grad_clip: PosFloat | None = Field(1.0, description="max gradient norm (None: no clipping)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast of training, accuracy and zero-shot forwards: auto = bf16 "
                            "on CUDA, fp32 elsewhere; fp16 = the study's AMP (float16 autocast "
                            "+ GradScaler), CUDA only")
    drop_last: bool = Field(
        False, description="drop the ragged last batch of each epoch (the study kept it)")
    flip: bool = Field(True, description="random horizontal flip of training images")
    compile: Literal["inductor", "aot_eager", "cudagraphs"] | None = Field(
        None, json_schema_extra=role("replicate"),
        description="torch.compile backend for the training forward (inductor: fastest, "
                    "compiles for ~1 min first); null: eager")
    log_every: PosInt = Field(10, json_schema_extra=role("replicate"),
                              description="steps between loss logs and divergence checks")
    checkpoint_every: PosInt | None = Field(
        None, json_schema_extra=role("operational"),
        description="steps between resume checkpoints, whatever checkpoint_minutes says")
    checkpoint_minutes: Annotated[float, Field(ge=0)] = Field(
        10.0, json_schema_extra=role("operational"),
        description="resume checkpoint at the first epoch end at least this many minutes "
                    "after the last one (0: every epoch end)")


class BudgetConfig(_Strict):
    train: PosInt = Field(description="training images per class")
    val: PosInt = Field(description="validation images per class")
    probe: PosInt = Field(description="probe images per class, disjoint from validation")


class ZeroShotEval(_Strict):
    templates: str | list[str] | None = Field(
        None, description="prompt templates with one {} for the class name: a list, or a named "
                          "set (attndrift.data.prompts.TEMPLATE_SETS: paper21, later, "
                          "openai_cifar, ...); null: the dataset's own")
    names: Literal["clean", "raw"] = Field(
        "clean", description="clean: descriptive, humanised names; raw: the dataset's label "
                             "names as stored (underscores kept)")
    images: PosInt | None = Field(
        None, description="score a class-balanced subset of this many test images (null: all)")
    seed: int = Field(0, description="seed of that subset (identical across runs)")

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, value: str | list[str] | None) -> str | list[str] | None:
        from attndrift.data.prompts import check_templates

        check_templates(value)
        return value


Severity = Annotated[int, Field(ge=1, le=5)]


class RobustnessConfig(_Strict):
    splits: list[str] = Field(
        [], description="corrupted test splits the dataset publishes (eurosat: contrast, "
                        "gaussian_noise, impulse_noise, jpeg_compression, motion_blur, "
                        "pixelate, spatter)")
    corruptions: list[str] = Field(
        [], description="ImageNet-C corruptions generated from the test split "
                        "(attndrift.data.corruptions.CORRUPTIONS)")
    severities: list[Severity] = Field([3], min_length=1,
                                       description="severities (1-5) of each generated one")
    images: PosInt | None = Field(
        1000, description="class-balanced images scored per corrupted split (null: all)")
    seed: int = Field(0, description="seed of the subsets and of the generated corruptions")

    @model_validator(mode="after")
    def _known(self) -> RobustnessConfig:
        from attndrift.data.corruptions import CORRUPTIONS

        if not self.splits and not self.corruptions:
            raise ValueError("data.robustness names no splits and no corruptions; give one, or "
                             "set data.robustness: null")
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruption {unknown[0]!r}; known: {', '.join(CORRUPTIONS)}")
        return self


class DataConfig(_Strict):
    dataset: str = Field("shapes-layout", description="registered dataset to fine-tune on")
    zeroshot: list[str] = Field(["shapes-zs-shape"], json_schema_extra=role("replicate"),
                                description="zero-shot transfer tasks")
    val_frac: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="share of the training split held out (stratified) for validation")
    split_seed: int = Field(42, description="seed of the train/validation split")
    train_limit: PosInt | None = Field(None, description="use at most this many training images")
    eval_batch_size: PosInt = Field(256, json_schema_extra=role("replicate"),
                                    description="batch for accuracy and zero-shot")
    resident_mb: Annotated[int, Field(ge=0)] = Field(
        4096, json_schema_extra=role("operational"),
        description="keep the uint8 training images on the device when they take at most "
                    "this many MB, and gather each batch there (0: gather on the host)")
    # added after run ids were handed out: at their defaults they are left out of ids
    budget: BudgetConfig | None = Field(
        None, json_schema_extra=role("identity", omit_default=True),
        description="per-class train / val / probe counts carved from the training split "
                    "(the later protocol); val_frac is then unused, and probes come from "
                    "the probe split, not from validation")
    zeroshot_eval: dict[str, ZeroShotEval] = Field(
        {}, json_schema_extra=role("identity", omit_default=True),
        description="per zero-shot task: templates, class-name style, subset size")
    robustness: RobustnessConfig | None = Field(
        None, json_schema_extra=role("replicate", omit_default=True),
        description="accuracy on corrupted test splits (published or generated)")

    @model_validator(mode="after")
    def _protocol(self) -> DataConfig:
        stray = sorted(set(self.zeroshot_eval) - set(self.zeroshot))
        if stray:
            raise ValueError(f"data.zeroshot_eval names {stray[0]!r}, which is not in "
                             f"data.zeroshot ({self.zeroshot})")
        if self.robustness is not None and self.robustness.splits:
            from attndrift.data.robustness import check_named_splits

            check_named_splits(self.dataset, self.robustness.splits)
        return self

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        check_dataset_name(name, "classification")
        return name

    @field_validator("zeroshot")
    @classmethod
    def _known_zeroshot(cls, names: list[str]) -> list[str]:
        for name in names:
            check_dataset_name(name, "zeroshot")
        return names


def check_dataset_name(name: str, role: str) -> None:
    """Raise `ValueError` (one line) unless ``name`` is a dataset a run can read in ``role``
    (classification: train and test splits; zeroshot: test). Local folders are checked on
    disk now (`attndrift.data.imagefolder.check_imagefolder`), so a bad one stops a run at
    validation, before anything is recorded; whether hub datasets can be had here is
    `check_downloads`' question."""
    from attndrift.data.hf import REAL_DATASETS, parse_hf_name
    from attndrift.data.registry import available_tasks, known_names

    tasks = available_tasks()
    if name in tasks:
        if role == "classification" and tasks[name].kind != "classification":
            raise ValueError(f"{name} is a zero-shot task (test split only); fine-tune on one of "
                             + ", ".join(n for n, t in tasks.items() if t.kind == role))
        return
    if name in REAL_DATASETS:
        return
    if name.startswith("hf:"):
        parse_hf_name(name)
        return
    if name.startswith("imagefolder:"):
        from attndrift.data.imagefolder import check_imagefolder

        try:
            check_imagefolder(name, ("train", "test") if role == "classification" else ("test",))
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        return
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(known_names())}")


class ProbeConfig(_Strict):
    per_epoch: Annotated[int, Field(ge=0)] = Field(5, description="attention probes per epoch")
    images: PosInt = Field(200, description="class-balanced probe images from the validation split")
    subsets: PosInt = Field(
        5, description="fixed probe subsets measured before and after training (subset CV); "
                       "the first one is also probed during training")
    seed: int = Field(42, description="seed of the probe subset (identical across a study's runs)")
    batch_size: PosInt = Field(64, json_schema_extra=role("replicate"),
                               description="batch of the attention probe forward")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", json_schema_extra=role("replicate"),
        description="forwards of the probes, auxiliary metrics and APR cache: bf16 "
                    "autocast is several times faster on GPUs (the CLS attention row "
                    "is recomputed in fp32 from q and k either way)")
    aux: list[Literal["rollout", "cka", "drift"]] = Field(
        ["rollout", "cka", "drift"], json_schema_extra=role("replicate"),
        description="auxiliary metrics: attention rollout and patch-to-patch entropy, "
                    "layerwise CKA to the pretrained model, weight/embedding drift")
    aux_every: Annotated[int, Field(ge=0)] | None = Field(
        None, json_schema_extra=role("replicate"),
        description="also measure the auxiliary metrics at every k-th training probe "
                    "(0: only before and after training; unset: once per epoch, every "
                    "per_epoch-th probe)")
    zeroshot_every: Annotated[int, Field(ge=0)] | None = Field(
        None, json_schema_extra=role("replicate"),
        description="zero-shot accuracy on a fixed class-balanced subset of each transfer "
                    "task at every k-th training probe and the last, into the history (0: "
                    "only before and after training, on the whole test split; unset: once "
                    "per epoch, every per_epoch-th probe)")
    zeroshot_images: PosInt = Field(
        1000, json_schema_extra=role("replicate"),
        description="images per transfer task in that subset (seeded by probe.seed)")

    def period(self, every: int | None) -> int:
        """A tracking cadence in training probes (``aux_every``, ``zeroshot_every``): ``every``,
        or once per epoch when unset (every ``per_epoch``-th probe, the epoch's last; every
        probe when ``per_epoch`` is 0 and the last step is the only one). 0 = off."""
        return max(1, self.per_epoch) if every is None else every

    @model_validator(mode="after")
    def _enough_for_cka(self) -> ProbeConfig:
        if "cka" in self.aux and self.images < 2:  # else every run fails in setup
            raise ValueError("probe.images=1: CKA compares at least 2 images; set "
                             "probe.images >= 2 or leave cka out of probe.aux")
        return self


class RegularizerConfig(_Strict):
    name: Literal[("none", *REGULARIZERS)] = Field(  # type: ignore[valid-type]
        "none", description="none | " + " | ".join(
            f"{n} ({s.summary})" for n, s in REGULARIZERS.items()))
    lam: Annotated[float, Field(ge=0)] = Field(0.0, json_schema_extra=role("regularizer"),
                                               description="weight of the regularizer")
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, json_schema_extra=role("regularizer"),
        description="apr / entropy_floor: vision layers it acts on (None: all)")
    ratio: Annotated[float, Field(gt=0, le=1)] = Field(
        0.7, json_schema_extra=role("regularizer"),
        description="entropy_floor: floor = ratio x the layer's pretrained entropy")

    @model_validator(mode="after")
    def _consistent(self) -> RegularizerConfig:
        if self.name == "none" and self.lam:
            raise ValueError("regularizer.lam is set but regularizer.name is none")
        if self.name != "none" and self.lam == 0:
            raise ValueError(f"regularizer {self.name} needs regularizer.lam > 0")
        return self


class EvalConfig(_Strict):
    checkpoint: Literal["final", "best"] = Field(
        "final", description="weights the final evaluation measures (test accuracy, zero-shot, "
        "final attention and drift, auxiliary metrics, interpolation): final = the last step's, "
        "best = the best validation epoch's, restored first (the later protocol; it also "
        "writes best.safetensors)")


# datasets whose labels a horizontal flip changes (shapes-layout: left/right positions)
FLIP_CHANGES_LABELS = frozenset({"shapes-layout"})


class RunConfig(_Strict):
    name: str = Field("run", json_schema_extra=role("replicate"),
                      description="a label for the run, used in its id and default "
                      "directory: no / or \\, not starting with ., at most 200 bytes")
    seed: int = Field(42, json_schema_extra=role("replicate"),
                      description="model head init, data order, dropout, augmentation")
    model: str = Field("tiny", description="'tiny' (shipped), a hub id or a local CLIP directory")
    method: Literal[tuple(METHODS)] = Field(  # type: ignore[valid-type]
        "full_ft", description="what trains: " + "; ".join(
            f"{n} ({s.summary})" for n, s in METHODS.items()))
    freeze_layers: Annotated[int, Field(ge=0)] = Field(
        0, json_schema_extra=role("method"),
        description="method=freeze: number of leading vision layers frozen")
    lora: LoraConfig = Field(LoraConfig(), json_schema_extra=role("method"))
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    probe: ProbeConfig = ProbeConfig()
    regularizer: RegularizerConfig = RegularizerConfig()
    # early-warning guard (attndrift.guard); off (added later), it is left out of run ids
    guard: GuardConfig = Field(GuardConfig(), json_schema_extra=role("identity", omit_default=True))
    # which weights the final evaluation measures; added later: final is left out of run ids
    eval: EvalConfig = Field(EvalConfig(), json_schema_extra=role("identity", omit_default=True))
    tensorboard: bool = Field(False, json_schema_extra=role("operational"),
                              description="write TensorBoard scalars to OUT/tensorboard "
                                          "(needs `pip install -e '.[tensorboard]'`)")
    trackers: list[Literal[tuple(TRACKERS)]] = Field(  # type: ignore[valid-type]
        [], json_schema_extra=role("operational"),
        description=f"experiment trackers that get the run's scalars, of {', '.join(TRACKERS)} "
                    "(`attndrift.trackers`; each needs its extra, e.g. `pip install -e "
                    "'.[wandb]'`; one not installed is skipped with a warning)")
    device: str = Field("auto", json_schema_extra=role("replicate"),
                        description="auto, cpu, cuda, cuda:N")
    save_checkpoints: bool = Field(True, json_schema_extra=role("operational"),
                                   description="write final and best safetensors")

    @model_validator(mode="before")
    @classmethod
    def _flip_default(cls, data: Any) -> Any:
        # train.flip defaults to on, except on datasets whose labels a flip changes
        if isinstance(data, dict):
            section = data.get("data", {})
            dataset = (section.get("dataset", "shapes-layout") if isinstance(section, dict)
                       else getattr(section, "dataset", None))
            train = data.get("train", {})
            if dataset in FLIP_CHANGES_LABELS and isinstance(train, dict) and "flip" not in train:
                data = {**data, "train": {**train, "flip": False}}
        return data

    @field_validator("name")
    @classmethod
    def _path_safe_name(cls, name: str) -> str:
        check_name(name)
        return name

    @field_validator("model")
    @classmethod
    def _model_exists(cls, name: str) -> str:
        from attndrift.models.clip import check_model_name

        check_model_name(name)
        return name

    @model_validator(mode="after")
    def _method_args(self) -> RunConfig:
        if self.method == "freeze" and self.freeze_layers == 0:
            raise ValueError("method=freeze needs freeze_layers >= 1")
        if self.method != "freeze" and self.freeze_layers:
            raise ValueError(f"freeze_layers={self.freeze_layers} only applies to method=freeze")
        if self.train.precision == "fp16" and self.device == "cpu":
            raise ValueError("train.precision=fp16 (autocast + GradScaler) needs a CUDA device; "
                             "use train.precision=bf16 or fp32 on the CPU")
        if self.train.flip and self.data.dataset in FLIP_CHANGES_LABELS:
            raise ValueError(f"train.flip=true swaps the labels of {self.data.dataset} (its "
                             "classes are left/right positions); set train.flip=false")
        if self.guard.signal is not None:
            check_measured(self.guard.signal, list(self.probe.aux), self.probe.aux_every,
                           self.probe.zeroshot_every)
        reg = REGULARIZERS.get(self.regularizer.name)
        if self.train.compile and reg is not None and reg.attention:
            raise ValueError(f"train.compile cannot trace regularizer {self.regularizer.name} "
                             "(it hooks the attention on every step); set train.compile=null")
        return self


# Every field carries its role (`attndrift.fields`). Operational keys are left out of run ids
# (`identity`): changing them on a study resumes or skips its runs instead of redoing them.
RUN_ROLES = Roles(RunConfig)
OPERATIONAL_KEYS: tuple[tuple[str, ...], ...] = RUN_ROLES.operational_keys
identity = RUN_ROLES.identity


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except YamlError as err:
            raise ConfigError(f"override {shorten(item)}: {err}") from None
        _set_dotted(data, key.strip(), value)
    return data


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    got = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"unknown key {loc!r}; remove it or fix its spelling (see docs/config.md)"
    if isinstance(got, float) and not math.isfinite(got):
        return f"{loc}: {got} is not allowed; give a finite number"
    if first["type"] == "value_error":  # our validators' messages say what they got
        msg = first["msg"].removeprefix("Value error, ")
        return f"{loc}: {msg}" if first["loc"] else msg
    shown = "" if isinstance(got, dict) else f" (got {shorten(got)})"
    if isinstance(got, str) and first["type"] in ("float_type", "int_type") and looks_numeric(got):
        shown += f"; remove the quotes around {shorten(got)}: quoted, it is text"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{loc}: {first['msg']}{shown}{more}"


def validate(data: Any, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None


def check_downloads(configs: list[RunConfig], source: str = "config") -> None:
    """Raise `ConfigError` (one line) if a hub model or dataset of ``configs`` can be had
    neither from a local copy, nor the cache, nor the hub answering one short probe
    (`attndrift.hub`): offline that is the cache alone. The entry points (`run`, `validate`,
    `study run`) call it after validating, so a missing download stops a run in seconds,
    before anything is recorded. `load_config` and `validate` never touch the network: they
    check the schema, names and local paths only."""
    from attndrift.data.hf import REAL_DATASETS, hub_dataset_problem, parse_hf_name
    from attndrift.models.clip import hub_problem, looks_local, resolve_source

    models, datasets = {}, {}
    for cfg in configs:
        models.setdefault(cfg.model, None)
        for name in (cfg.data.dataset, *cfg.data.zeroshot):
            if name in REAL_DATASETS or name.startswith("hf:"):
                datasets.setdefault(name, None)
    for name in models:
        if looks_local(name) or Path(resolve_source(name)).expanduser().is_dir():
            continue  # the shipped tiny CLIP or a local directory: checked at validation
        problem = hub_problem(name)
        if problem:
            raise ConfigError(f"{source}: model: {problem}")
    for name in datasets:
        problem = hub_dataset_problem(REAL_DATASETS.get(name) or parse_hf_name(name))
        if problem:
            raise ConfigError(f"{source}: data: {problem}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or defaults if ``path`` is None), apply overrides, validate."""
    data: Any = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = parse_yaml(path.read_text())
        except YamlError as err:
            raise ConfigError(f"{path}: {err}") from None
        if data is None:  # every default is rarely what anyone meant
            raise ConfigError(f"{path} is empty; a run config names at least its method and "
                              "data (see configs/runs/tiny_full_ft.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys")
    return validate(apply_overrides(data, overrides or []), source)

reference_markdown = RUN_ROLES.reference_markdown
