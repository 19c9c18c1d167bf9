"""Experiment specs: YAML -> validated ``Experiment`` -> Ray Tune param_space.

Validation happens here, before Ray starts or MLflow is touched, so a bad spec is
reported with the field, the bad value and what is allowed, and nothing is written.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.errors import UserInputError
from orchestrator.redact import redact
from trainables.config import ConfigError, TrainConfig, parse_config, text_number_hint
from trainables.data import SHAPES
from trainables.models import check_fits, model_names
from trainables.train import CURVATURE_KEY, METRIC_KEYS

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
KNOWN_TRAIN_SIZES = {
    "digits": 1437,
    "mnist": 60000,
    "cifar10": 50000,
    "cifar100": 50000,
    "synthetic": 256,
}
GRID_KEYS = ("batch_size", "robust", "seed")
TOP_LEVEL_KEYS = (*GRID_KEYS, "dataset", "model")
SEARCH_KINDS = {
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "qloguniform": 3,
    "randint": 2,
    "choice": None,
    "grid": None,
}
_TRAINING_KEYS = {f for f in TrainConfig.__dataclass_fields__ if f not in TOP_LEVEL_KEYS}
TRIAL_METRICS = (*METRIC_KEYS, CURVATURE_KEY)  # what every trial reports each epoch


def _trial_metric(metric: str) -> str:
    if metric not in TRIAL_METRICS:
        raise ValueError(f"not a metric trials report; use one of {', '.join(TRIAL_METRICS)}")
    return metric


TrialMetric = Annotated[str, AfterValidator(_trial_metric)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def search_values(dist: dict[str, list[Any]]) -> list[Any]:
    """Values a distribution can take that a spec check must try: every choice, or the ends
    of a range (``randint``'s upper end is exclusive)."""
    ((kind, args),) = dist.items()
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return list(args[:2])


class _Strict(BaseModel):
    """Unknown keys are errors; numbers and booleans use the Strict* types (no true -> 1,
    no "yes" -> true, no "5" -> 5), while YAML integers still fill float fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RobustSetting(_Strict):
    """One robust-training setting of the sweep (``none`` is plain training)."""

    method: Literal["none", "fgsm", "pgd"] = "none"
    epsilon: StrictFloat = Field(0.0, ge=0.0, le=1.0, validate_default=True)
    steps: StrictInt = Field(10, ge=1)
    step_size: StrictFloat | None = Field(None, gt=0.0)
    adv_fraction: StrictFloat = Field(1.0, gt=0.0, le=1.0)

    @field_validator("epsilon")
    @classmethod
    def _needs_epsilon(cls, epsilon: float, info: ValidationInfo) -> float:
        """An attack with no budget is plain training; checked on the field (default too)
        so the error names ``robust.N.epsilon``."""
        method = info.data.get("method")
        if method not in (None, "none") and epsilon <= 0:
            raise ValueError(f"method {method!r} needs epsilon > 0, e.g. epsilon: 0.1")
        return epsilon

    @property
    def label(self) -> str:
        """Short name used in tables and run names: ``none``, ``fgsm-0.1``."""
        return "none" if self.method == "none" else f"{self.method}-{self.epsilon:g}"

    def to_train(self) -> dict[str, Any]:
        """The trainable's ``robust`` dict."""
        return self.model_dump()


class SearchSpec(_Strict):
    """Tune search spaces for training keys, sampled ``num_samples`` times per grid cell."""

    space: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    num_samples: StrictInt = Field(1, ge=1)
    scheduler: Literal["none", "asha"] = "none"
    metric: TrialMetric = "train/loss"
    mode: Literal["min", "max"] = "min"
    grace_period: StrictInt = Field(1, ge=1)

    @model_validator(mode="after")
    def _samples_need_a_space(self, info: ValidationInfo) -> SearchSpec:
        """Samples of an empty space are copies of one trial (same config, same seed)."""
        if self.num_samples > 1 and not self.space and not _stored(info):
            raise ValueError(
                f"search.num_samples: {self.num_samples} samples of an empty search.space are "
                "identical trials; add a search.space, or use seeds for repeats"
            )
        return self

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list]]:
        for key, dist in space.items():
            if key not in _TRAINING_KEYS:
                raise ValueError(
                    f"search.space.{key}: not a searchable training key; use one of "
                    f"{', '.join(sorted(_TRAINING_KEYS))}"
                )
            if len(dist) != 1:
                raise ValueError(
                    f"search.space.{key}: give exactly one distribution, e.g. "
                    "{loguniform: [0.001, 1]}"
                )
            ((kind, args),) = dist.items()
            if kind not in SEARCH_KINDS:
                raise ValueError(
                    f"search.space.{key}: unknown distribution {kind!r}; use one of "
                    f"{', '.join(SEARCH_KINDS)}"
                )
            want = SEARCH_KINDS[kind]
            if (want is not None and len(args) != want) or not args:
                raise ValueError(
                    f"search.space.{key}.{kind}: expected "
                    f"{want or 'a non-empty list of'} values, got {args!r}"
                )
            if want is not None and not all(_is_number(a) for a in args):
                bad = next(a for a in args if not _is_number(a))
                raise ValueError(
                    f"search.space.{key}.{kind}: bounds must be numbers, got {args!r}"
                    f"{text_number_hint(bad)}"
                )
            if kind in ("loguniform", "qloguniform") and min(args[:2]) <= 0:
                raise ValueError(f"search.space.{key}.{kind}: bounds must be > 0, got {args!r}")
            if want is not None and not args[0] < args[1]:
                raise ValueError(
                    f"search.space.{key}.{kind}: the lower bound must come first and be "
                    f"below the upper one, got {args!r}"
                )
            if kind.startswith("q") and not args[2] > 0:
                raise ValueError(f"search.space.{key}.{kind}: the step q must be > 0")
            if kind.startswith("q") and not all(
                math.isclose(b / args[2], round(b / args[2])) for b in args[:2]
            ):
                raise ValueError(
                    f"search.space.{key}.{kind}: both bounds must be multiples of q "
                    f"(Tune refuses others), got {args!r}"
                )
        return space


class SelectSpec(_Strict):
    """Keep only the best trial of each (batch size, robust, seed) cell by a final metric."""

    metric: TrialMetric = "test/acc"
    mode: Literal["min", "max"] = "max"


class HessianSpec(_Strict):
    """What the Hessian phase computes for each kept trial, and on how many actors."""

    enabled: StrictBool = True
    top_k: StrictInt = Field(5, ge=1, le=200)
    tol: StrictFloat = Field(1e-6, gt=0.0, lt=1.0)
    criterion: Literal["residual", "eigenvalue"] = "residual"
    max_iter: StrictInt | None = Field(None, ge=1)
    trace: StrictBool = True
    trace_rtol: StrictFloat = Field(0.05, gt=0.0, lt=1.0)
    trace_max_probes: StrictInt = Field(200, ge=10)
    density: StrictBool = True
    # One probe: its broadened density is within 0.001 (L1) of a 4-probe mean on a
    # 550k-parameter CNN (0.004 on a 14k one), and more probes cost `density_steps` each.
    density_probes: StrictInt = Field(1, ge=1)
    density_steps: StrictInt = Field(60, ge=2)
    input_samples: StrictInt = Field(200, ge=0)
    input_k: StrictInt = Field(1, ge=1)
    dtype: Literal["float32", "float64"] = "float64"
    num_actors: StrictInt = Field(1, ge=1)
    cpus_per_actor: StrictFloat = Field(1.0, gt=0.0)
    gpus_per_actor: StrictFloat = Field(0.0, ge=0.0)
    seed: StrictInt = Field(0, ge=0)

    @model_validator(mode="after")
    def _room_for_every_eigenvalue(self) -> HessianSpec:
        """Lanczos needs a step per eigenvalue asked for: ``top_k``, and both ends of each
        input Hessian (``2 input_k``); found here, not after the training."""
        need = max(self.top_k, 2 * self.input_k)
        if self.max_iter is not None and self.max_iter < need:
            raise ValueError(
                f"max_iter {self.max_iter} is below the {need} eigenvalues asked for (top_k, "
                f"or 2 x input_k for the input Hessians' two ends); give max_iter >= {need}"
            )
        return self


class Resources(_Strict):
    """Ray resources of one trial (fractional GPUs allowed)."""

    cpus: StrictFloat = Field(1.0, gt=0.0)
    gpus: StrictFloat = Field(0.0, ge=0.0)


class Experiment(_Strict):
    """A batch-size x robust-training x seed sweep, its Hessian analysis and where it goes."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    dataset: str = "digits"
    data_root: str | None = None
    model: str = "m1"
    batch_sizes: list[StrictInt | Literal["full"]] = Field(min_length=1)
    robust: list[RobustSetting] = Field(default_factory=lambda: [RobustSetting()], min_length=1)
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1)
    training: dict[str, Any] = Field(default_factory=dict)
    search: SearchSpec | None = None
    select: SelectSpec | None = None
    hessian: HessianSpec = Field(default_factory=HessianSpec)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent_trials: StrictInt | None = Field(None, ge=1)
    max_failures: StrictInt = Field(2, ge=0)
    storage: str = "runs/ray"
    tracking_uri: str | None = None
    description: str = ""

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _batch_values(cls, sizes: Any) -> Any:
        """One line per bad batch size (the int-or-"full" type alone reports two per value)."""
        for i, b in enumerate(sizes if isinstance(sizes, list) else ()):
            if b != "full" and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
                raise ValueError(
                    f"batch_sizes[{i}]: got {b!r}{text_number_hint(b, integer=True)}; "
                    'expected a positive integer or "full"'
                )
        return sizes

    @field_validator("batch_sizes")
    @classmethod
    def _unique(cls, sizes: list[int | str]) -> list[int | str]:
        if len(set(map(str, sizes))) != len(sizes):
            raise ValueError(f"batch_sizes: duplicates in {sizes}; list each batch size once")
        return sizes

    @field_validator("robust")
    @classmethod
    def _distinct_robust(cls, robust: list[RobustSetting]) -> list[RobustSetting]:
        labels = [r.label for r in robust]
        for i, label in enumerate(labels):
            if label in labels[:i]:
                raise ValueError(
                    f"robust[{i}] and robust[{labels.index(label)}] are both {label!r}: cells, "
                    "run names and tables are keyed by method and epsilon, so list each "
                    "(method, epsilon) once"
                )
        return robust

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: got {seeds}; expected distinct integers >= 0")
        return seeds

    @field_validator("training")
    @classmethod
    def _training_keys(cls, training: dict[str, Any]) -> dict[str, Any]:
        for key in training:
            if key not in _TRAINING_KEYS:
                raise ValueError(
                    f"training.{key}: unknown training key{_training_key_hint(key)}; allowed: "
                    f"{', '.join(sorted(_TRAINING_KEYS))}"
                )
        return training

    @field_validator("storage")
    @classmethod
    def _storage(cls, storage: str) -> str:
        if not storage.strip():
            raise ValueError(
                "storage: empty; give a folder (default runs/ray), s3://, gs:// or file://"
            )
        if "://" in storage and not re.match(r"^(s3|gs|file)://", storage):
            raise ValueError(f"storage {storage!r}: use a local path, s3://, gs:// or file://")
        return storage

    @model_validator(mode="after")
    def _check_trials(self, info: ValidationInfo) -> Experiment:
        """Every grid cell, and every value of every search key, must be a valid training
        config for the trainable (a bad one would otherwise fail only inside its trial),
        reporting the metrics selection and ASHA read."""
        for config in self.trial_configs() + self._search_variants():
            try:
                parsed = parse_config(config)
                size = KNOWN_TRAIN_SIZES.get(self.dataset)
                if size is not None:
                    parsed.check_data(size)
                if not _stored(info):
                    _check_steps(parsed)
            except ConfigError as err:
                message = spec_field_message(str(err))
                for key in self.search.space if self.search else ():
                    message = message.replace(f"training.{key}:", f"search.space.{key}:")
                raise ValueError(message) from None
            self._check_device(parsed)
            self._check_metrics(parsed)
            self._check_shape(parsed)
        return self

    def _check_shape(self, cfg: TrainConfig) -> None:
        """The model must take the data set's images, and an input Hessian must have room
        for both ends' ``hessian.input_k`` eigenvalues: either would fail only after training."""
        shape = SHAPES.get(cfg.dataset)
        if shape is None:
            return
        misfit = _misfit(cfg.model, shape)
        if misfit is not None:
            fitting = [m for m in model_names() if _misfit(m, shape) is None]
            raise ValueError(
                f"model: {cfg.model} does not fit the {shape[1]}x{shape[2]}x{shape[2]} images "
                f"of {cfg.dataset} ({misfit}); use one of {', '.join(fitting)} for {cfg.dataset}"
            )
        pixels = shape[1] * shape[2] ** 2
        h = self.hessian
        if h.enabled and h.input_samples > 0 and 2 * h.input_k > pixels:
            raise ValueError(
                f"hessian.input_k: {h.input_k} eigenvalues at each end of an input Hessian need "
                f"{2 * h.input_k}, but the inputs of {cfg.dataset} have {pixels} values; use "
                f"input_k <= {pixels // 2}"
            )

    def _check_device(self, cfg: TrainConfig) -> None:
        """A trial on CUDA needs a GPU from Ray: one given 0 GPUs sees none and fails."""
        if cfg.device.startswith("cuda") and self.resources.gpus == 0:
            space = self.search.space if self.search else {}
            field = "search.space.device" if "device" in space else "training.device"
            raise ValueError(
                f"{field}: {cfg.device!r} needs a GPU, but resources.gpus is 0 and Ray hides "
                "every GPU from a trial given none, so each trial would fail; set "
                "resources.gpus > 0 (e.g. 0.25) or use device auto"
            )

    @model_validator(mode="after")
    def _check_actors(self) -> Experiment:
        """Each Hessian actor holds a shard of the training set: no more actors than samples."""
        size = KNOWN_TRAIN_SIZES.get(self.dataset)
        if self.hessian.enabled and size is not None and self.hessian.num_actors > size:
            raise ValueError(
                f"hessian.num_actors: {self.hessian.num_actors} actors for the {size} "
                f"training samples of {self.dataset}; use at most {size}"
            )
        return self

    def _check_metrics(self, cfg: TrainConfig) -> None:
        """Selection and ASHA read a metric from each trial's latest result: it must be
        there (not NaN, not missing) whatever epoch a trial with ``cfg`` stops at."""
        uses = [("select.metric", self.select.metric, False)] if self.select else []
        if self.search and self.search.scheduler == "asha":
            uses.append(("search.metric", self.search.metric, True))
        for field, metric, every_epoch in uses:
            if metric == CURVATURE_KEY and not _curvature_in_last_result(cfg, every_epoch):
                raise ValueError(
                    f"{field}: {metric} is in a trial's result only on epochs that are "
                    "multiples of training.hessian_every; set training.hessian_every: 1"
                )
            if metric == "test/adv_acc" and cfg.eval_attack.method == "none":
                raise ValueError(
                    f"{field}: test/adv_acc is NaN without training.eval_attack; set one "
                    "or pick another metric"
                )

    def trial_configs(self) -> list[dict[str, Any]]:
        """Each grid cell's training config, with search keys at their first value."""
        base = {"dataset": self.dataset, "model": self.model, **self.training}
        if self.data_root is not None:
            base["data_root"] = self.data_root
        space = self.search.space if self.search else {}
        for key, dist in space.items():
            base[key] = search_values(dist)[0]
        cells = [
            {**base, "batch_size": b, "robust": r.to_train(), "seed": s}
            for b in self.batch_sizes
            for r in self.robust
            for s in self.seeds
        ]
        return cells

    def _search_variants(self) -> list[dict[str, Any]]:
        """Every cell with each further value of each search key: a value can be valid for
        one cell and not another (``micro_batch_size`` 64 with batch size 16)."""
        space = self.search.space if self.search else {}
        return [
            {**cell, key: value}
            for cell in self.trial_configs()
            for key, dist in space.items()
            for value in search_values(dist)[1:]
        ]

    @property
    def num_cells(self) -> int:
        """Grid cells: batch sizes x robust settings x seeds."""
        return len(self.batch_sizes) * len(self.robust) * len(self.seeds)

    @property
    def search_grids(self) -> dict[str, int]:
        """The number of values of each search key given as a ``grid``."""
        space = self.search.space if self.search else {}
        return {key: len(dist["grid"]) for key, dist in space.items() if "grid" in dist}

    @property
    def num_trials(self) -> int:
        """Trials Tune runs: each cell once per search sample and per combination of the
        search space's ``grid`` values (Tune repeats every grid in each sample)."""
        if self.search is None:
            return self.num_cells
        return self.num_cells * self.search.num_samples * math.prod(self.search_grids.values())

    @classmethod
    def from_yaml(cls, path: str | Path) -> Experiment:
        """Load and validate a spec file, or the spec of that name in experiments/ (as the CLI
        does); errors name the file, the field and the fix."""
        p = resolve_spec(str(path))
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserInputError(
                f"{p}: not UTF-8 text ({err.reason} at byte {err.start}); save the spec as "
                "UTF-8 (plain YAML)"
            ) from None
        except OSError as err:
            raise UserInputError(
                f"{p}: cannot read the spec ({err.strerror or err}); check that the file is "
                "readable by you"
            ) from None
        try:
            raw = load_yaml(text, source=str(p))
        except yaml.YAMLError as err:
            raise UserInputError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise UserInputError(
                f"{p}: a spec is a YAML mapping of fields, got {type(raw).__name__}"
            )
        return cls.from_dict(raw, source=str(p))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "spec", stored: bool = False
    ) -> Experiment:
        """Validate a plain dict, turning pydantic errors into one readable message.

        ``stored`` marks a spec read back from a sweep that already ran: the checks that only
        keep new specs from asking for nothing (search samples of an empty space, lr steps
        after the last epoch) are skipped, so a sweep started before them still resumes."""
        try:
            return cls.model_validate(raw, context={STORED: True} if stored else None)
        except ValidationError as err:
            raise UserInputError(format_errors(source, err)) from None

    def with_overrides(self, **overrides: Any) -> Experiment:
        """A new validated Experiment with fields replaced; dotted keys reach nested fields
        (``training__lr=0.1`` or ``**{"training.lr": 0.1}``).

        Errors name the overrides that caused them (all of them when none matches)."""
        return self.overridden(overrides, via="override")

    def overridden(self, overrides: dict[str, Any], via: str = "override") -> Experiment:
        """``with_overrides`` for a mapping; errors name each key as ``{via} key``
        (``override``, or the CLI's ``--set``, whose examples then use its syntax)."""
        data = self.model_dump(exclude_none=False)
        keys = [key.replace("__", ".") for key in overrides]
        for key, value in zip(keys, overrides.values(), strict=True):
            set_dotted(data, key, value, via)
        try:
            return Experiment.model_validate(data)
        except ValidationError as err:
            raise UserInputError(format_errors(_override_source(keys, err, via), err)) from None

    def to_param_space(self) -> dict[str, Any]:
        """The Tune param_space: grid over batch size x robust x seed, plus search spaces."""
        from ray import tune

        space: dict[str, Any] = {"dataset": self.dataset, "model": self.model, **self.training}
        if self.data_root is not None:
            space["data_root"] = self.data_root
        # Tune varies the first grid key fastest: robust settings of one batch size start
        # together, and the largest batches (the most epochs to a target loss) start first,
        # so the longest trials do not run alone at the end.
        space["robust"] = tune.grid_search([r.to_train() for r in self.robust])
        space["batch_size"] = tune.grid_search(sorted(self.batch_sizes, key=_batch_rank))
        space["seed"] = tune.grid_search(list(self.seeds))
        if self.search:
            for key, dist in self.search.space.items():
                space[key] = search_domain(dist)
        return space

    def to_yaml(self, redacted: bool = False) -> str:
        """The spec as YAML (round-trips through ``from_yaml``); ``redacted`` masks secrets."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(redact(data) if redacted else data, sort_keys=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last silently, so a second ``training:`` block would drop the first)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Check a mapping's own keys, then merge its ``<<`` keys in (they may be overridden).

        The check runs once a node, before merging: merging rewrites a merged mapping's
        node in place, and an alias of it met later would show the merged keys as repeats.
        """
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base class reports an unhashable key
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first on line {seen[key] + 1}); give each key "
                        "once",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
        super().flatten_mapping(node)


# YAML 1.1 (PyYAML) reads 1e-6 as text, wanting a dot (1.0e-6); YAML 1.2 and people read a
# number, so the loader does too.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text as Python data, refusing duplicate keys; errors point at ``source``."""
    loader = _UniqueKeyLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _curvature_in_last_result(cfg: TrainConfig, every_epoch: bool) -> bool:
    """Whether the per-epoch curvature is in every result (ASHA) or in the last one: a trial
    with a target may stop at any epoch, one without stops at ``max_epochs``."""
    every = cfg.hessian_every
    if every is None:
        return False
    if every == 1:
        return True
    return not every_epoch and cfg.target_train_loss is None and cfg.max_epochs % every == 0


def _training_key_hint(key: str) -> str:
    """Where a misplaced or misspelled training key belongs: the top level, or a close key."""
    if key in TOP_LEVEL_KEYS:
        return " (set it at the top level of the spec)"
    close = difflib.get_close_matches(key, sorted(_TRAINING_KEYS), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _override_source(keys: list[str], err: ValidationError, via: str) -> str:
    """The overridden keys whose fields the errors name, so the user sees which one to fix."""
    fields = [_error_field(e) for e in err.errors()]
    hit = [k for k in keys if any(_same_field(k, f) for f in fields)]
    return ", ".join(f"{via} {k}" for k in hit or keys)


def _error_field(error: Any) -> str:
    """The dotted spec field a pydantic error is about (a model check names it in its text)."""
    loc = ".".join(str(p) for p in error["loc"])
    return loc or re.split(r"[:\s]", _error_text(error), maxsplit=1)[0]


def _same_field(key: str, field: str) -> bool:
    """Whether ``--set key`` sets ``field``, a field inside it, or a mapping holding it."""
    short, long = sorted((key, field), key=len)
    return long == short or long.startswith((f"{short}.", f"{short}["))


def _batch_rank(batch: int | str) -> float:
    """Sort key putting full batch first, then larger batches before smaller ones."""
    return -math.inf if batch == "full" else -float(batch)


STORED = "stored"  # validation context: a spec read back from a sweep's saved state


def _stored(info: ValidationInfo) -> bool:
    """Whether this validation reads back a stored spec (``Experiment.from_dict(stored=True)``)."""
    return bool(info.context and info.context.get(STORED))


def _check_steps(cfg: TrainConfig) -> None:
    """A step schedule must step before the last epoch: later steps never happen."""
    schedule = cfg.lr_schedule
    if schedule.type != "step":
        return
    if not schedule.epochs:
        raise ConfigError(
            f"config key 'lr_schedule.epochs': every N epochs with N >= max_epochs "
            f"({cfg.max_epochs}) never steps; give N < max_epochs, or a list of epochs"
        )
    if schedule.epochs[-1] >= cfg.max_epochs:
        raise ConfigError(
            f"config key 'lr_schedule.epochs': got {list(schedule.epochs)}; a step at or after "
            f"max_epochs ({cfg.max_epochs}) never happens, so give epochs below it"
        )


@functools.cache
def _misfit(model: str, shape: tuple[int, int, int]) -> str | None:
    """Why ``model`` cannot take images of ``shape`` (``check_fits``'s message), or None;
    cached, as every grid cell asks."""
    try:
        check_fits(model, *shape)
    except ValueError as err:
        return str(err)
    return None


def spec_field_message(message: str) -> str:
    """Rename the trainable's config keys in a message to the spec fields that set them."""

    def rename(match: re.Match[str]) -> str:
        key = match.group(1)
        top = key.split(".")[0]
        field = {"batch_size": "batch_sizes", "seed": "seeds", "robust": "robust"}.get(top)
        if field is None:
            field = top if top in ("dataset", "model", "data_root") else f"training.{key}"
        return f"{field}:"

    return re.sub(r"config key '([\w.]+)':", rename, message)


def search_domain(dist: dict[str, list[Any]]) -> Any:
    """A Tune search-space object from ``{kind: args}``."""
    from ray import tune

    ((kind, args),) = dist.items()
    if kind == "choice":
        return tune.choice(args)
    if kind == "grid":
        return tune.grid_search(args)
    return getattr(tune, kind)(*args)


def set_dotted(data: dict[str, Any], dotted: str, value: Any, via: str = "--set") -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating mappings as needed."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            field = ".".join(parts[: i + 1])
            raise UserInputError(f"{via} {dotted}: {_not_a_mapping(field, node[part], via)}")
        node = node[part]
    node[parts[-1]] = value


def _not_a_mapping(field: str, current: Any, via: str) -> str:
    """Why ``field`` has no sub-keys to set, and how to set it whole instead."""

    def example(value: str, python_value: str) -> str:
        if via == "--set":
            return f"--set {field}={value}"
        return f"with_overrides({field.replace('.', '__')}={python_value})"

    if field == "robust":
        whole = example("'[{method: fgsm, epsilon: 0.2}]'", "[{'method': 'fgsm', 'epsilon': 0.2}]")
        return f"robust is a list of settings, not a mapping; set the whole list, e.g. {whole}"
    if isinstance(current, list):
        whole = example("[...]", "[...]")
        return f"{field} is a list, not a mapping; set the whole list, e.g. {whole}"
    return f"{field} is not a mapping; set it whole, e.g. {example('VALUE', 'VALUE')}"


def format_errors(source: str, err: ValidationError) -> str:
    """One line per problem: ``field: message (got value)``."""
    lines = [f"{source}: {err.error_count()} problem(s) in the experiment spec:"]
    lines += [f"  - {_error_line(e)}" for e in err.errors()]
    return "\n".join(lines)


def _error_line(error: Any) -> str:
    """``field: message (got value)``, the field once even when the message names it."""
    loc = ".".join(str(p) for p in error["loc"])
    msg = _error_text(error)
    if not loc or _same_field(loc, re.split(r"[:\s]", msg, maxsplit=1)[0]):
        return msg
    got = error.get("input")
    shown = "" if isinstance(got, dict) or error["type"] == "missing" else f" (got {got!r})"
    fix = f"; {_FIELD_FIXES[loc]}" if loc in _FIELD_FIXES else ""
    return f"{loc}: {msg}{shown}{_number_hint(error)}{fix}"


# What to write instead, for the top-level fields whose pydantic messages do not say it.
_FIELD_FIXES = {
    "name": "give letters, digits, '_', '.' or '-' (starting with a letter or digit, at most "
    "100), e.g. name: my-study",
    "batch_sizes": "give a list of sizes, e.g. batch_sizes: [16, 64, full]",
}


def _error_text(error: Any) -> str:
    """A pydantic error's message, without pydantic's prefix and in the spec's words."""
    if error["type"] == "extra_forbidden":
        return "unknown field; check the spelling (experiments/reference.yaml lists every field)"
    return error["msg"].removeprefix("Value error, ")


def _number_hint(error: Any) -> str:
    """The text-number hint for a number field given a string such as ``'1e3'``."""
    kind = error["type"]
    if not kind.startswith(("int_", "float_")):
        return ""
    return text_number_hint(error.get("input"), integer=kind.startswith("int_"))


def resolve_spec(spec: str) -> Path:
    """A spec path, or the name of a spec in experiments/ (``demo`` -> experiments/demo.yaml)."""
    p = Path(spec)
    if p.is_file():
        return p
    named = EXPERIMENTS_DIR / f"{spec}.yaml"
    if named.is_file():
        return named
    known = sorted(f.stem for f in EXPERIMENTS_DIR.glob("*.yaml"))
    raise UserInputError(
        f"no spec file {spec!r} and no experiment named {spec!r}; known experiments: "
        f"{', '.join(known) or '(none)'}"
    )


def finite(x: float) -> bool:
    """True for a finite number (used when reading metrics back)."""
    return isinstance(x, (int, float)) and math.isfinite(x)
