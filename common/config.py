"""The run config: one typed view of `[tool.flwr.app.config]`, validated once.

The defaults live only in pyproject.toml; this module checks types and allowed values so a typo in
`--set` or in a config file fails before any model is loaded, naming the key and what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from common.methods import METHODS as _METHODS

PROJECT_DIR = Path(__file__).resolve().parent.parent

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg")
# The keys only some strategies read (server/strategy.py); under any other strategy they change nothing.
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "fedprox": ("proximal-mu",),
    "fedadam": ("server-learning-rate",),
    "fedyogi": ("server-learning-rate",),
    "fedavgm": ("server-learning-rate", "server-momentum"),
    "fedtrimmedavg": ("trim-beta",),
}
# The keys only DP reads (server/privacy.py, client/mods.py): without noise they change nothing.
DP_KEYS = (
    *("noise-multiplier", "clipping-norm", "dp-delta", "max-epsilon", "target-epsilon"),
    *("dp-clipping", "dp-server-momentum"),
)
NOISELESS_PRIVACY = ("none", "secagg")
# The keys only the per-user gate reads (client/gate.py): under personal-gate = "none" they change nothing.
GATE_KEYS = ("personal-holdout", "personal-gate-evals", "personal-gate-weights", "personal-gate-refit")
PROFILE_MODES = ("summary", "generated")
PEFT_TYPES = ("lora", "dora", "ia3")
WIRE_DTYPES = ("fp32", "fp16")
SHARED_OPTIMIZERS = ("adamw", "sgd")  # the shared adapter's local steps (client/training.py)
DP_CLIPPING = (
    "adaptive",
    "fixed",
)  # central-dp: Andrew et al.'s adaptive clip norm, or clipping-norm throughout
PERSONAL_GATES = ("none", "choice", "mix")  # client/gate.py
VALIDATION = "validation"  # split: common/loaders.py validation_split
SPLITS = ("test", VALIDATION)
# The privacy layer of the shared adapter (server/privacy.py, client/mods.py); docs/privacy.md compares them.
PRIVACY_SETTINGS = ("none", "central-dp", "client-dp", "adaptive-dp", "local-dp", "secagg", "secagg+dp")
METHODS = tuple(_METHODS)
# benchmark-shifted-queries (common/synthetic.py): the built-in tasks where a query's topic can be
# absent from the user's history.
SHIFT_TASKS = ("tagging",)
SHIFT_REASON = (
    "only tagging's answers follow a topic (the movie's theme) that a history can leave out; rating's "
    "personal rule follows the sentiment and title's the user's style, on every item alike"
)
AUTO = "auto"  # autocast-bf16: measured on the machine that computes (common/precision.py)
ALL_LAYERS = "all"  # adapter-layers: every decoder layer
# device: "auto" (CUDA when torch sees it, else the CPU), "cpu", "cuda" or "cuda:N" (common/device.py)
DEVICE_SETTING = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_CHOICES = {
    "strategy": STRATEGIES,
    "profile": PROFILE_MODES,
    "peft_type": PEFT_TYPES,
    "wire_dtype": WIRE_DTYPES,
    "shared_optimizer": SHARED_OPTIMIZERS,
    "dtype": ("fp32", "bf16"),
    "privacy": PRIVACY_SETTINGS,
    "dp_clipping": DP_CLIPPING,
    "personal_gate": PERSONAL_GATES,
    "split": SPLITS,
}
# Settings that can sample clients per round other than by fraction-train: SecAgg+'s legacy workflow
# samples by fraction only; Flower's client-dp and adaptive-dp wrappers need a fixed count per round.
FIXED_SIZE_SAMPLING = ("none", "central-dp", "client-dp", "adaptive-dp", "local-dp")
POISSON_SAMPLING = ("none", "central-dp", "local-dp")
TARGET_EPSILON = ("central-dp", "client-dp", "local-dp")  # common/accounting.py: TARGETED_SCALE


class ConfigError(ValueError):
    """A run-config key is unknown, missing or has a value of the wrong type or range."""


@dataclass(frozen=True)
class RunConfig:
    model: str
    dtype: str
    autocast_bf16: bool | str
    device: str
    data: str
    task: str
    benchmark_users: int
    benchmark_min_history: int
    benchmark_max_history: int
    benchmark_queries: int
    benchmark_personal_strength: float
    benchmark_shifted_queries: int
    max_users: int
    split: str
    users_per_client: int
    seed: int
    num_rounds: int
    fraction_train: float
    clients_per_round: int
    sample_rate: float
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    server_momentum: float
    trim_beta: float
    peft_type: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str
    shared_ffa_lora: bool
    adapter_layers: int | str
    shared_lora_r: int
    shared_lora_alpha: int
    shared_target_modules: str
    shared_adapter_layers: int | str
    hidden_cache_mb: int
    local_steps: int
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    shared_optimizer: str
    wire_dtype: str
    privacy: str
    noise_multiplier: float
    clipping_norm: float
    dp_delta: float
    max_epsilon: float
    target_epsilon: float
    dp_clipping: str
    dp_server_momentum: float
    min_nodes: int
    min_nodes_timeout: float
    train_timeout: float
    personalize_timeout: float
    evaluate_timeout: float
    min_train_fraction: float
    min_train_clients: int
    train_retries: int
    max_update_norm: float
    personal_epochs: float
    personal_learning_rate: float
    personal_gate: str
    personal_holdout: float
    personal_gate_evals: int
    personal_gate_weights: str
    personal_gate_refit: bool
    rag_k: int
    profile: str
    max_item_tokens: int
    max_context_tokens: int
    max_seq_len: int
    max_queries_per_user: int
    eval_every_round: bool
    methods: str
    run_dir: str
    state_dir: str
    resume: bool

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "run config") -> RunConfig:
        """Build from Flower's flat, hyphenated run config (or any mapping with the same keys)."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = sorted(set(known) - set(values))
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}")
        kwargs = {f.name: _coerce(key, values[key], f.type, source) for key, f in known.items()}
        config = cls(**kwargs)
        config.validate(source)
        return config

    def validate(self, source: str = "run config") -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{source}: {_key(name)} = {getattr(self, name)!r}; expected one of {allowed}"
                )
        for name in self.method_list:
            if name not in METHODS:
                raise ConfigError(f"{source}: methods has {name!r}; expected a comma list of {METHODS}")
        if self.autocast_bf16 not in (True, False, AUTO):
            raise ConfigError(
                f"{source}: autocast-bf16 = {self.autocast_bf16!r}; expected true, false or {AUTO!r}"
            )
        if not DEVICE_SETTING.fullmatch(self.device):
            raise ConfigError(
                f"{source}: device = {self.device!r}; expected {AUTO!r}, 'cpu', 'cuda' or 'cuda:N' (N = 0, 1, ...)"
            )
        self._validate_layouts(source)
        positive = ("num_rounds", "lora_r", "lora_alpha", "local_steps", "batch_size", "users_per_client")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {_key(name)} = {getattr(self, name)}; expected an integer >= 1")
        if self.hidden_cache_mb < 0:
            raise ConfigError(f"{source}: hidden-cache-mb = {self.hidden_cache_mb}; expected >= 0")
        if self.micro_batch_size < 0:
            raise ConfigError(
                f"{source}: micro-batch-size = {self.micro_batch_size}; expected >= 0 (0 = batch-size)"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"{source}: fraction-train = {self.fraction_train}; expected 0 < value <= 1")
        if not 0.0 <= self.benchmark_personal_strength <= 1.0:
            raise ConfigError(
                f"{source}: benchmark-personal-strength = {self.benchmark_personal_strength}; expected 0..1"
            )
        self._validate_shift(source)
        if self.personal_epochs < 0:
            raise ConfigError(f"{source}: personal-epochs = {self.personal_epochs}; expected >= 0")
        self._validate_sampling(source)
        self._validate_privacy(source)
        self._validate_failures(source)
        self._validate_gate(source)
        if self.rag_k < 1 and any(_METHODS[name].rag for name in self.method_list):
            raise ConfigError(
                f"{source}: rag-k = {self.rag_k}, but methods {self.methods!r} retrieve; expected >= 1"
            )

    def _validate_shift(self, source: str) -> None:
        shifted = self.benchmark_shifted_queries
        if shifted < 0:
            raise ConfigError(f"{source}: benchmark-shifted-queries = {shifted}; expected >= 0 (0 = off)")
        if shifted and (self.data != "builtin" or self.task not in SHIFT_TASKS):
            raise ConfigError(
                f"{source}: benchmark-shifted-queries = {shifted} needs the built-in benchmark (data = "
                f"'builtin') with task {' or '.join(map(repr, SHIFT_TASKS))}, not data = {self.data!r}, "
                f"task = {self.task!r}: {SHIFT_REASON}"
            )

    def _validate_layouts(self, source: str) -> None:
        """Both adapters' layouts; the shared adapter's own keys also take 0 or "": the personal one's."""
        if not self.target_module_list:
            raise ConfigError(
                f"{source}: target-modules = {self.target_modules!r}; expected a comma list of names"
            )
        for name, unset in (("adapter_layers", ""), ("shared_adapter_layers", "0 (= adapter-layers), ")):
            value = getattr(self, name)
            if value != ALL_LAYERS and (isinstance(value, str) or value < (0 if unset else 1)):
                raise ConfigError(
                    f"{source}: {_key(name)} = {value!r}; expected {unset}{ALL_LAYERS!r} or a number of top "
                    "decoder layers >= 1"
                )
        for name in ("shared_lora_r", "shared_lora_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{source}: {_key(name)} = {getattr(self, name)}; expected an integer >= 1, or 0 "
                    f"(= {_key(name.removeprefix('shared_'))})"
                )

    def _validate_sampling(self, source: str) -> None:
        if self.clients_per_round < 0:
            raise ConfigError(
                f"{source}: clients-per-round = {self.clients_per_round}; expected >= 0 (0 = fraction-train)"
            )
        if not 0.0 <= self.sample_rate < 1.0:
            raise ConfigError(
                f"{source}: sample-rate = {self.sample_rate}; expected 0 <= value < 1 (0 = off)"
            )
        if self.clients_per_round and self.sample_rate:
            raise ConfigError(
                f"{source}: clients-per-round = {self.clients_per_round} and sample-rate = {self.sample_rate}; "
                "set one of them (fixed-size or Poisson sampling), the other to 0"
            )
        if self.clients_per_round and self.privacy not in FIXED_SIZE_SAMPLING:
            raise ConfigError(
                f"{source}: clients-per-round works with privacy {FIXED_SIZE_SAMPLING}, not {self.privacy!r} "
                "(SecAgg+ samples by fraction-train)"
            )
        if self.sample_rate and self.privacy not in POISSON_SAMPLING:
            raise ConfigError(
                f"{source}: sample-rate (Poisson sampling) works with privacy {POISSON_SAMPLING}, not "
                f"{self.privacy!r}: its wrapper needs the same number of clients every round"
            )

    def _validate_privacy(self, source: str) -> None:
        if self.clipping_norm <= 0:
            raise ConfigError(f"{source}: clipping-norm = {self.clipping_norm}; expected > 0")
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError(f"{source}: dp-delta = {self.dp_delta}; expected 0 < value < 1")
        if self.max_epsilon < 0:
            raise ConfigError(f"{source}: max-epsilon = {self.max_epsilon}; expected >= 0 (0 = no budget)")
        if self.target_epsilon < 0:
            raise ConfigError(f"{source}: target-epsilon = {self.target_epsilon}; expected >= 0 (0 = off)")
        if self.target_epsilon and self.privacy not in TARGET_EPSILON:
            raise ConfigError(
                f"{source}: target-epsilon works with privacy {TARGET_EPSILON}, not {self.privacy!r}"
            )
        if not 0.0 <= self.dp_server_momentum < 1.0:
            raise ConfigError(
                f"{source}: dp-server-momentum = {self.dp_server_momentum}; expected 0 <= value < 1"
            )
        if self.shared_ffa_lora and self.peft_type != "lora":
            raise ConfigError(
                f"{source}: shared-ffa-lora = true needs peft-type = 'lora', not {self.peft_type!r}"
            )
        if self.privacy == "none":
            return
        if self.noise_multiplier <= 0 and self.privacy != "secagg" and not self.target_epsilon:
            raise ConfigError(
                f"{source}: privacy = {self.privacy!r} needs noise-multiplier > 0, got {self.noise_multiplier}"
            )
        # DP needs uniform FedAvg aggregation (sensitivity per user); SecAgg+ exists only on the legacy FedAvg.
        allowed = ("fedavg",) if self.privacy.startswith("secagg") else ("fedavg", "fedprox")
        if self.strategy not in allowed:
            raise ConfigError(
                f"{source}: privacy = {self.privacy!r} works with strategy {' or '.join(allowed)}, "
                f"not {self.strategy!r}"
            )

    def _validate_gate(self, source: str) -> None:
        if not 0.0 < self.personal_holdout < 1.0:
            raise ConfigError(f"{source}: personal-holdout = {self.personal_holdout}; expected 0 < value < 1")
        if self.personal_gate_evals < 1:
            raise ConfigError(
                f"{source}: personal-gate-evals = {self.personal_gate_evals}; expected an integer >= 1"
            )
        try:
            weights = _weights(self.personal_gate_weights)
        except ValueError:
            weights = ()
        if not weights or 1.0 not in weights or any(not 0.0 <= w <= 1.0 for w in weights):
            raise ConfigError(
                f"{source}: personal-gate-weights = {self.personal_gate_weights!r}; expected a comma list of "
                "numbers in 0..1 that includes 1"
            )
        if self.personal_gate == "mix" and self.peft_type != "lora":
            raise ConfigError(
                f"{source}: personal-gate = 'mix' scales the shared LoRA adapter; peft-type = "
                f"{self.peft_type!r} needs personal-gate = 'choice' or 'none'"
            )

    def _validate_failures(self, source: str) -> None:
        if self.min_nodes < 1 or self.min_train_clients < 1:
            name = "min_nodes" if self.min_nodes < 1 else "min_train_clients"
            raise ConfigError(f"{source}: {_key(name)} = {getattr(self, name)}; expected an integer >= 1")
        if self.train_retries < 0:
            raise ConfigError(f"{source}: train-retries = {self.train_retries}; expected an integer >= 0")
        if not 0.0 < self.min_train_fraction <= 1.0:
            raise ConfigError(
                f"{source}: min-train-fraction = {self.min_train_fraction}; expected 0 < value <= 1"
            )
        for name in ("min_nodes_timeout", "train_timeout", "personalize_timeout", "evaluate_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{source}: {_key(name)} = {getattr(self, name)}; expected seconds >= 0 (0 = no limit)"
                )
        if self.max_update_norm < 0:
            raise ConfigError(
                f"{source}: max-update-norm = {self.max_update_norm}; expected >= 0 (0 = no bound)"
            )

    def timeout(self, phase: str) -> float | None:
        """`<phase>-timeout` in seconds (train, personalize, evaluate, min-nodes), None for 0: no limit."""
        return getattr(self, f"{phase.replace('-', '_')}_timeout") or None

    @property
    def uniform_client_weights(self) -> bool:
        """Under any privacy layer every client counts once: user-level sensitivity, no example counts."""
        return self.privacy != "none"

    @property
    def unread_keys(self) -> set[str]:
        """The keys this run never reads (another strategy's, DP's without noise, the gate's without a
        gate): two runs differing only there are the same run."""
        every = {key for keys in STRATEGY_KEYS.values() for key in keys}
        unread = every - set(STRATEGY_KEYS.get(self.strategy, ()))
        if self.privacy in NOISELESS_PRIVACY:
            unread.update(DP_KEYS)
        if self.personal_gate == "none":
            unread.update(GATE_KEYS)
        return unread

    @property
    def method_list(self) -> list[str]:
        return [name.strip() for name in self.methods.split(",") if name.strip()]

    @property
    def gate_weights(self) -> tuple[float, ...]:
        """The shared adapter's weights the gate tries: personal-gate-weights under "mix", else 1 alone."""
        return _weights(self.personal_gate_weights) if self.personal_gate == "mix" else (1.0,)

    @property
    def gate_setting(self) -> str:
        """What a stored personal adapter's gate was decided under: a changed setting retrains it."""
        if self.personal_gate == "none":
            return "none"
        weights = ",".join(f"{w:g}" for w in self.gate_weights)
        refit = ":refit" if self.personal_gate_refit else ""
        return f"{self.personal_gate}:holdout={self.personal_holdout:g}:evals={self.personal_gate_evals}:weights={weights}{refit}"

    @property
    def target_module_list(self) -> list[str]:
        return _names(self.target_modules)

    @property
    def shared_layout(self) -> tuple[int, float, list[str], int | str]:
        """The shared adapter's (r, alpha, target modules, adapter layers): its `shared-*` keys, each
        unset one (0, "") the personal adapter's."""
        return (
            self.shared_lora_r or self.lora_r,
            self.shared_lora_alpha or self.lora_alpha,
            _names(self.shared_target_modules) or self.target_module_list,
            self.shared_adapter_layers or self.adapter_layers,
        )

    def to_flower(self) -> dict[str, Any]:
        """The flat, hyphenated form Flower's run config uses."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _weights(text: str) -> tuple[float, ...]:
    """A comma list of numbers, largest first, without repeats."""
    return tuple(sorted({float(w) for w in text.split(",") if w.strip()}, reverse=True))


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, annotation: str, source: str) -> Any:
    if "|" in annotation:  # e.g. "bool | str": a value of either type, checked by validate()
        options = [name.strip() for name in annotation.split("|")]
        for name in options:
            with contextlib.suppress(ConfigError):
                return _coerce(key, value, name, source)
        raise ConfigError(
            f"{source}: {key} = {value!r} ({type(value).__name__}); expected {' or '.join(options)}"
        )
    expected = {"int": int, "float": float, "bool": bool, "str": str}[annotation]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} = {value!r} ({type(value).__name__}); expected {annotation}")
    return value


@functools.cache
def flower_app_table() -> dict[str, Any]:
    """pyproject.toml's [tool.flwr.app]: the app's components and its run config's defaults."""
    with open(PROJECT_DIR / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]


def default_config_values() -> dict[str, Any]:
    """The defaults, read from the app's pyproject.toml (the single source of truth)."""
    return dict(flower_app_table()["config"])


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key=value` override with TOML value syntax; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_run_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Defaults from pyproject, then a command's `preset` (e.g. compare-privacy's federations), then a
    TOML file of overrides, then `key=value` overrides."""
    values = default_config_values()
    source = "run config"
    if preset:
        _check_known(preset, values, "preset")
        values.update(preset)
    if config_file is not None:
        path = Path(config_file)
        try:
            with open(path, "rb") as handle:
                table = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{path}: cannot read config file: {err}") from err
        table = table.get("tool", {}).get("flwr", {}).get("app", {}).get("config", table)
        _check_known(table, values, str(path))
        values.update(table)
        source = str(path)
    for text in overrides or []:
        key, value = parse_override(text)
        _check_known({key: value}, values, "--set")
        values[key] = value
    return RunConfig.from_mapping(values, source)


def _check_known(new: Mapping[str, Any], known: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(new) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
