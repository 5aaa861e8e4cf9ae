"""The training config: YAML → small frozen dataclasses, every value checked, plus ``--set``.

A config is read with ``yaml.safe_load``, edited by ``--set key=value`` overrides (dotted keys,
values parsed as YAML) and only then validated, so an override is checked exactly like the file.
Every problem is one :class:`ConfigError` line that names the offending key, e.g.
``config key 'optimizer.lr': expected a number, got 'fast'``. Unknown keys are errors, not
silently ignored: a typo such as ``warmpu`` would otherwise train a different model than the
one written down.

:meth:`TrainConfig.to_dict` gives the resolved config (every default filled in); parsing it
again gives the same config, which is what RUN_DIR/config.yaml and the checkpoints store.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from restore_cli.errors import ConfigError, RestoreCliError

if TYPE_CHECKING:
    from restore_cli.degradations import MixtureSpec

LOSS_TYPES = ("l1", "charbonnier", "psnr", "fft")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
VAL_METRICS = ("psnr", "ssim")
VAL_COLORS = ("rgb", "y")
DEFAULT_TYPES = ("noise", "blur", "jpeg", "lowlight", "haze", "rain", "snow")
DEFAULT_LEVELS = ("light", "medium", "heavy")

# YAML 1.1 reads ``1e-4`` (no dot) as a string; accept such numbers where a float is expected.
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class InitWeights:
    """Weights to start from: ``path`` (safetensors), its keys prefixed with ``prefix``."""

    path: str
    prefix: str = ""


@dataclass(frozen=True)
class ModelSection:
    """The network: a registered architecture and its constructor config (official kwargs).

    ``init`` starts a new run from other weights (an earlier training stage, or a dense model's
    weights inside a larger one); ``stage`` names the part a staged model trains (UniRestorer:
    encoder, experts, router); the model then computes its own losses. ``experts`` narrows
    UniRestorer's experts stage to the named experts (e.g. ``[degree8]``), freezing the rest;
    ``expert_route`` says which expert each crop trains there (``nearest``: its cluster's, the
    paper's; ``auto``: the one auto mode would route it to).
    """

    arch: str
    config: dict[str, Any]
    init: tuple[InitWeights, ...] = ()
    stage: str | None = None
    experts: tuple[str, ...] = ()
    expert_route: str = "nearest"


@dataclass(frozen=True)
class DegradationSection:
    """The on-the-fly mixture, with the same meaning as the `synthesize` options."""

    types: tuple[str, ...] = DEFAULT_TYPES
    levels: tuple[str, ...] = DEFAULT_LEVELS
    mixed: tuple[int, int] | None = None
    gated: bool = False
    probability: float = 0.5
    ood: float = 0.0
    clean: float = 0.0  # the share of crops left undegraded (identity pairs)
    # per-type overrides of ``probability``, e.g. {noise: 0.45}
    type_probability: dict[str, float] = field(default_factory=dict)

    def mixture(self) -> MixtureSpec:
        from restore_cli.synthesize import make_spec  # lazily: config parsing stays light

        return make_spec(
            list(self.types),
            list(self.levels),
            mixed=self.mixed,
            gated=self.gated,
            probability=self.probability,
            ood=self.ood,
            clean=self.clean,
            type_probability=self.type_probability,
        )


@dataclass(frozen=True)
class DataSection:
    """Training pairs (``pairs`` folder or ``clean`` photos + degradations) and the val set.

    Validation uses ``val_pairs`` (a `synthesize` output folder, whole images) when given,
    else ``val_count`` fixed-seed crops of the ``val_clean`` photos degraded on the fly.
    """

    pairs: str | None = None
    clean: tuple[str, ...] = ()
    degradations: DegradationSection = field(default_factory=DegradationSection)
    max_side: int | None = None
    epoch_length: int | None = None
    val_pairs: str | None = None
    val_clean: tuple[str, ...] = ()
    val_count: int = 16
    val_crop: int = 256
    val_seed: int = 2024


@dataclass(frozen=True)
class OptimizerSection:
    type: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.0


@dataclass(frozen=True)
class SchedulerSection:
    """Learning-rate factor per iteration: linear warm-up, then cosine / multistep / constant."""

    type: str = "cosine"
    warmup: int = 0
    min_lr: float = 1e-7
    milestones: tuple[int, ...] = ()
    gamma: float = 0.5


@dataclass(frozen=True)
class LossTerm:
    type: str
    weight: float = 1.0
    eps: float = 1e-3  # Charbonnier only


@dataclass(frozen=True)
class ValSection:
    """Which metrics validation logs, with the paper convention named in each column."""

    metrics: tuple[str, ...] = VAL_METRICS
    color: str = "rgb"
    crop_border: int = 0


@dataclass(frozen=True)
class LogSection:
    every: int = 10
    print_every: int = 100
    tensorboard: bool = False


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    crop: int = 128
    batch: int = 8
    workers: int = 2
    device: str = "auto"
    threads: int | None = None  # torch CPU threads of each process; None = torch's default
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    losses: tuple[LossTerm, ...] = (LossTerm("charbonnier"),)
    ema: float | None = 0.999
    ema_warmup: bool = False  # decay min(ema, (1+t)/(10+t)); off keeps the shipped runs' EMA
    precision: str = "fp32"
    channels_last: bool = False
    grad_clip: float | None = None
    iterations: int = 1000
    val_every: int = 500
    val: ValSection = field(default_factory=ValSection)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    deterministic: bool = False
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON types (tuples become lists)."""
        resolved = _plain(dataclasses.asdict(self))
        if self.data.pairs is not None and not self.data.val_clean:  # no mixture in use
            resolved["data"]["degradations"] = None
        return resolved


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config {path} ({error})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {path}{where}: {problem}") from None
    raw = apply_overrides({} if raw is None else raw, overrides)
    try:
        return parse_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def apply_overrides(raw: Any, overrides: Iterable[str]) -> Any:
    """Return a copy of ``raw`` with each ``a.b.c=VALUE`` set (VALUE parsed as YAML).

    Missing sections are created; a numeric part indexes a list (``losses.0.weight=2``).
    """
    raw = copy.deepcopy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. optimizer.lr=2e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {text!r} as YAML") from None
        raw = _set_dotted(raw, key, value)
    return raw


def _set_dotted(raw: Any, key: str, value: Any) -> Any:
    parts = key.split(".")
    if not isinstance(raw, dict):
        raise ConfigError(f"--set {key}: the config is not a mapping")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        child = _child(node, part, key)
        if child is None:
            child = {}
            _assign(node, part, child, key)
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {key}: {where!r} is a value, not a section")
        node = child
    _assign(node, parts[-1], value, key)
    return raw


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    return node.get(part)


def _assign(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, part, key)] = value
    else:
        node[part] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


# ----------------------------------------------------------------------------- validation


class _Fields:
    """The keys of one config mapping: unknown keys refused up front, typed getters after."""

    def __init__(self, raw: Any, where: str, allowed: Iterable[str]) -> None:
        self.where = where
        allowed = list(allowed)
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            label = f"config key {where!r}" if where else "the config"
            raise ConfigError(f"{label}: expected a mapping of keys, got {_kind(raw)}")
        for name in raw:
            if name not in allowed:
                raise ConfigError(
                    f"unknown config key {self.key(str(name))!r} "
                    f"(expected one of: {', '.join(allowed)})"
                )
        self.raw = raw

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"config key {self.key(name)!r}: {message}")

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def value(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        if name not in self.raw or self.raw[name] is None:
            if required:
                raise ConfigError(f"missing config key {self.key(name)!r}")
            return default
        return self.raw[name]

    def integer(self, name: str, default: Any = None, *, minimum: int | None = None) -> Any:
        value = self.value(name, default)
        if value is None:
            return None
        return _check_int(value, minimum, lambda m: self.fail(name, m))

    def number(
        self,
        name: str,
        default: Any = None,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
        below: float | None = None,
    ) -> Any:
        value = self.value(name, default)
        if value is None:
            return None
        return _check_float(value, minimum, maximum, above, below, lambda m: self.fail(name, m))

    def boolean(self, name: str, default: bool) -> bool:
        value = self.value(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"expected true or false, got {_show(value)}")
        return value

    def text(self, name: str, default: Any = None, *, choices: Sequence[str] = ()) -> Any:
        value = self.value(name, default, required=default is None and bool(choices))
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"expected a string, got {_show(value)}")
        if choices and value not in choices:
            raise self.fail(name, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def strings(self, name: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        value = self.value(name, list(default))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, f"expected a list of strings, got {_show(value)}")
        return tuple(value)

    def section(self, name: str, allowed: Iterable[str]) -> _Fields:
        return _Fields(self.value(name, {}), self.key(name), allowed)


def _check_int(value: Any, minimum: int | None, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise fail(f"expected an integer, got {_show(value)}")
    if minimum is not None and value < minimum:
        raise fail(f"must be >= {minimum}, got {value}")
    return int(value)


def _check_float(value: Any, minimum, maximum, above, below, fail) -> float:
    if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"expected a number, got {_show(value)}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise fail(f"expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise fail(f"must be >= {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise fail(f"must be <= {maximum:g}, got {value:g}")
    if above is not None and value <= above:
        raise fail(f"must be > {above:g}, got {value:g}")
    if below is not None and value >= below:
        raise fail(f"must be < {below:g}, got {value:g}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return f"{_kind(value)} {text if len(text) <= 40 else text[:39] + '…'}"


def _kind(value: Any) -> str:
    names = {dict: "mapping", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_config(raw: Any) -> TrainConfig:
    """Validate a config mapping (already overridden) into a :class:`TrainConfig`."""
    top = _Fields(raw, "", [f.name for f in dataclasses.fields(TrainConfig)])
    defaults = TrainConfig(ModelSection("", {}), DataSection())
    model = _parse_model(top)
    data = _parse_data(top)
    crop = top.integer("crop", defaults.crop, minimum=8)
    batch = top.integer("batch", defaults.batch, minimum=1)
    config = TrainConfig(
        model=model,
        data=data,
        crop=crop,
        batch=batch,
        workers=top.integer("workers", defaults.workers, minimum=0),
        device=_parse_device(top),
        threads=top.integer("threads", None, minimum=1),
        optimizer=_parse_optimizer(top),
        scheduler=_parse_scheduler(top),
        losses=_parse_losses(top),
        ema=top.number("ema", None, above=0, below=1),
        ema_warmup=top.boolean("ema_warmup", defaults.ema_warmup),
        precision=top.text("precision", defaults.precision, choices=PRECISIONS),
        channels_last=top.boolean("channels_last", defaults.channels_last),
        grad_clip=top.number("grad_clip", None, above=0),
        iterations=top.integer("iterations", defaults.iterations, minimum=1),
        val_every=top.integer("val_every", defaults.val_every, minimum=0),
        val=_parse_val(top),
        checkpoint_every=top.integer("checkpoint_every", defaults.checkpoint_every, minimum=1),
        keep_checkpoints=top.integer("keep_checkpoints", defaults.keep_checkpoints, minimum=1),
        seed=top.integer("seed", defaults.seed, minimum=0),
        deterministic=top.boolean("deterministic", defaults.deterministic),
        log=_parse_log(top),
    )
    if "ema" not in top.raw:  # absent = the default; an explicit null turns EMA off
        config = dataclasses.replace(config, ema=defaults.ema)
    if config.scheduler.warmup >= config.iterations:
        raise top.fail("scheduler.warmup", f"must be < iterations ({config.iterations})")
    if config.model.experts and config.optimizer.weight_decay:
        # decoupled weight decay would shrink the frozen experts' rows of the shared tensors
        raise top.fail("optimizer.weight_decay", "must be 0 when model.experts is set")
    return config


def _parse_model(top: _Fields) -> ModelSection:
    if not top.has("model"):
        raise ConfigError("missing config key 'model' (arch and config of the network)")
    fields = top.section("model", ["arch", "config", "init", "stage", "experts", "expert_route"])
    arch = fields.text("arch", None)
    if arch is None:
        raise ConfigError("missing config key 'model.arch' (e.g. nafnet)")
    config = fields.value("config", {})
    if not isinstance(config, Mapping):
        raise fields.fail(
            "config", f"expected a mapping of constructor kwargs, got {_kind(config)}"
        )
    config = dict(config)
    try:
        from restore_cli.models.registry import get_architecture

        get_architecture(arch).spec(config)  # checks the kwargs without building the network
    except RestoreCliError as error:
        name = "arch" if "unknown architecture" in str(error) else "config"
        raise fields.fail(name, str(error)) from None
    except (TypeError, ValueError) as error:
        raise fields.fail("config", str(error)) from None
    stage = fields.text("stage", None)
    experts = fields.strings("experts")
    if experts and stage != "experts":
        raise fields.fail("experts", "needs model.stage: experts")
    expert_route = fields.text("expert_route", "nearest")
    if expert_route != "nearest" and stage != "experts":
        raise fields.fail("expert_route", "needs model.stage: experts")
    return ModelSection(arch, config, _parse_init(fields), stage, experts, expert_route)


def _parse_init(fields: _Fields) -> tuple[InitWeights, ...]:
    """``init: PATH``, or a list of PATH / {path, prefix} entries."""
    raw = fields.value("init", None)
    if raw is None:
        return ()
    entries = raw if isinstance(raw, list) else [raw]
    parsed = []
    for entry in entries:
        if isinstance(entry, str):
            parsed.append(InitWeights(entry))
        elif isinstance(entry, Mapping) and set(entry) <= {"path", "prefix"} and "path" in entry:
            parsed.append(InitWeights(str(entry["path"]), str(entry.get("prefix", ""))))
        else:
            raise fields.fail("init", f"expected a path or {{path, prefix}}, got {_show(entry)}")
    return tuple(parsed)


def _parse_data(top: _Fields) -> DataSection:
    if not top.has("data"):
        raise ConfigError("missing config key 'data' (pairs: DIR or clean: [DIR, ...])")
    names = [f.name for f in dataclasses.fields(DataSection)]
    fields = top.section("data", names)
    defaults = DataSection()
    pairs = fields.text("pairs", None)
    clean = fields.strings("clean")
    if (pairs is None) == (not clean):
        raise ConfigError(
            "config key 'data': give exactly one of 'data.pairs' (a synthesize folder) and "
            "'data.clean' (folders of clean photos, degraded on the fly)"
        )
    val_pairs = fields.text("val_pairs", None)
    val_clean = fields.strings("val_clean")
    if pairs is not None and fields.has("degradations") and not val_clean:
        raise fields.fail(
            "degradations", "only used with 'data.clean' or 'data.val_clean' (pairs are degraded)"
        )
    if val_pairs is not None and val_clean:
        raise fields.fail("val_clean", "give either 'data.val_pairs' or 'data.val_clean'")
    return DataSection(
        pairs=pairs,
        clean=clean,
        degradations=_parse_degradations(fields),
        max_side=fields.integer("max_side", None, minimum=16),
        epoch_length=fields.integer("epoch_length", None, minimum=1),
        val_pairs=val_pairs,
        val_clean=val_clean,
        val_count=fields.integer("val_count", defaults.val_count, minimum=1),
        val_crop=fields.integer("val_crop", defaults.val_crop, minimum=16),
        val_seed=fields.integer("val_seed", defaults.val_seed, minimum=0),
    )


def _parse_degradations(data: _Fields) -> DegradationSection:
    names = [f.name for f in dataclasses.fields(DegradationSection)]
    fields = data.section("degradations", names)
    defaults = DegradationSection()
    mixed = fields.value("mixed", None)
    if mixed is not None:
        if isinstance(mixed, int) and not isinstance(mixed, bool):
            mixed = [mixed, mixed]
        if not (isinstance(mixed, list) and len(mixed) == 2):
            raise fields.fail("mixed", f"expected [K1, K2] or null, got {_show(mixed)}")
        mixed = tuple(_check_int(v, 1, lambda m: fields.fail("mixed", m)) for v in mixed)
    section = DegradationSection(
        types=fields.strings("types", defaults.types),
        levels=fields.strings("levels", defaults.levels),
        mixed=mixed,
        gated=fields.boolean("gated", defaults.gated),
        probability=fields.number("probability", defaults.probability, minimum=0, maximum=1),
        ood=fields.number("ood", defaults.ood, minimum=0, maximum=1),
        clean=fields.number("clean", defaults.clean, minimum=0, maximum=1),
        type_probability=_type_probabilities(fields),
    )
    try:
        section.mixture()
    except ConfigError as error:
        raise ConfigError(f"config key {fields.where!r}: {error}") from None
    return section


def _type_probabilities(fields: _Fields) -> dict[str, float]:
    """``type_probability``: type -> probability in [0, 1], each checked like any number key
    (whether the types exist is checked with the mixture)."""
    raw = fields.value("type_probability", {})
    section = fields.section("type_probability", raw if isinstance(raw, Mapping) else ())
    return {
        str(name): _check_float(value, 0, 1, None, None, lambda m, n=name: section.fail(str(n), m))
        for name, value in section.raw.items()
    }


def _parse_device(top: _Fields) -> str:
    device = top.text("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise top.fail("device", f"{device!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def _parse_optimizer(top: _Fields) -> OptimizerSection:
    fields = top.section("optimizer", [f.name for f in dataclasses.fields(OptimizerSection)])
    defaults = OptimizerSection()
    betas = fields.value("betas", list(defaults.betas))
    if not (isinstance(betas, list) and len(betas) == 2):
        raise fields.fail("betas", f"expected [beta1, beta2], got {_show(betas)}")
    betas = tuple(
        _check_float(b, 0, None, None, 1, lambda m: fields.fail("betas", m)) for b in betas
    )
    return OptimizerSection(
        type=fields.text("type", defaults.type, choices=OPTIMIZERS),
        lr=fields.number("lr", defaults.lr, above=0),
        betas=betas,
        weight_decay=fields.number("weight_decay", defaults.weight_decay, minimum=0),
    )


def _parse_scheduler(top: _Fields) -> SchedulerSection:
    fields = top.section("scheduler", [f.name for f in dataclasses.fields(SchedulerSection)])
    defaults = SchedulerSection()
    milestones = fields.value("milestones", [])
    if not isinstance(milestones, list):
        raise fields.fail("milestones", f"expected a list of iterations, got {_show(milestones)}")
    milestones = tuple(_check_int(m, 1, lambda e: fields.fail("milestones", e)) for m in milestones)
    if list(milestones) != sorted(set(milestones)):
        raise fields.fail("milestones", "must be increasing")
    kind = fields.text("type", defaults.type, choices=SCHEDULERS)
    if kind == "multistep" and not milestones:
        raise fields.fail("milestones", "multistep needs at least one milestone")
    return SchedulerSection(
        type=kind,
        warmup=fields.integer("warmup", defaults.warmup, minimum=0),
        min_lr=fields.number("min_lr", defaults.min_lr, minimum=0),
        milestones=milestones,
        gamma=fields.number("gamma", defaults.gamma, above=0, maximum=1),
    )


def _parse_losses(top: _Fields) -> tuple[LossTerm, ...]:
    raw = top.value("losses", [{"type": "charbonnier"}])
    if isinstance(raw, str):
        raw = [{"type": raw}]
    if not isinstance(raw, list) or not raw:
        raise top.fail("losses", f"expected a non-empty list of {{type, weight}}, got {_show(raw)}")
    terms = []
    for index, item in enumerate(raw):
        if isinstance(item, str):
            item = {"type": item}
        fields = _Fields(item, f"losses.{index}", [f.name for f in dataclasses.fields(LossTerm)])
        terms.append(
            LossTerm(
                type=fields.text("type", None, choices=LOSS_TYPES),
                weight=fields.number("weight", 1.0, above=0),
                eps=fields.number("eps", 1e-3, above=0),
            )
        )
    return tuple(terms)


def _parse_val(top: _Fields) -> ValSection:
    fields = top.section("val", [f.name for f in dataclasses.fields(ValSection)])
    metrics = fields.strings("metrics", VAL_METRICS)
    for metric in metrics:
        if metric not in VAL_METRICS:
            raise fields.fail("metrics", f"{metric!r} is not one of {', '.join(VAL_METRICS)}")
    return ValSection(
        metrics=metrics,
        color=fields.text("color", "rgb", choices=VAL_COLORS),
        crop_border=fields.integer("crop_border", 0, minimum=0),
    )


def _parse_log(top: _Fields) -> LogSection:
    fields = top.section("log", [f.name for f in dataclasses.fields(LogSection)])
    defaults = LogSection()
    return LogSection(
        every=fields.integer("every", defaults.every, minimum=1),
        print_every=fields.integer("print_every", defaults.print_every, minimum=1),
        tensorboard=fields.boolean("tensorboard", defaults.tensorboard),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (key order as in the dataclasses)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
