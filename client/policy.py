"""The node's privacy policy: what this node accepts, decided by its operator, not by the run config.

The run config comes from whoever submits the run; it asks for a privacy setting, a noise multiplier
and a clipping norm. A node checks that request against its own policy (a TOML file its operator
writes, `fedoppu node start --policy FILE`, which reaches the ClientApp as the node config's
`policy-path`) and refuses a run that asks for less. The refusal names the policy key in the node's
own log; the server gets only a generic code (common/protocol.py: NodeError).

The node also keeps a privacy ledger on its own disk, across runs: every release of its shared-adapter
update with the noise multiplier that protects it, so a per-node epsilon budget (`max-epsilon`) holds
whatever the runs ask, and a second train request for a (run, round) it already answered is refused.
Per-user evaluation records are keyed by a pseudonym, an HMAC of the user id under a secret that never
leaves the node.

Simulated nodes have no node config of their own: they use the policy file named by
$FEDOPPU_NODE_POLICY when it is set, else SIMULATION_POLICY, which lets every research setting run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from common import protocol
from common.config import PRIVACY_SETTINGS
from common.io import DataError, atomic_write_bytes, atomic_write_json, read_json

POLICY_PATH = "policy-path"  # node config key: the operator's policy file
POLICY_ENV = "FEDOPPU_NODE_POLICY"  # simulation: a policy file for every simulated node
LEDGER = "privacy-ledger.json"
SECRET = "node-secret"
USER_ID_MODES = ("pseudonym", "raw")
# Settings whose released update carries no Gaussian noise: no epsilon, noise 0, no clipping.
UNNOISED = ("none", "secagg")
_SHA256 = frozenset("0123456789abcdef")


class BadRequest(ValueError):
    """A request this node does not answer: an unknown message type or method, a malformed message, a
    run config that contradicts the node's own data."""


class PolicyRefusal(RuntimeError):
    """A request asks for less than the node's policy allows; `key` names the policy key."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"refused by policy key '{key}': {detail}")
        self.key = key


@dataclass(frozen=True)
class NodePolicy:
    """One node's policy; every field is a key of the policy file (underscores as hyphens)."""

    allowed_privacy: tuple[str, ...] = PRIVACY_SETTINGS
    min_noise_multiplier: float = 0.0
    max_clipping_norm: float = math.inf
    max_epsilon: float = 0.0  # per-node budget over every run this node ever trains in; 0 = none
    dp_delta: float = 1e-5  # the delta the budget's epsilon is computed at
    refuse_repeated_rounds: bool = True
    user_ids: str = "pseudonym"  # how the node's users appear in evaluate replies: pseudonym | raw
    per_user_history: bool = False  # a user record may carry the user's history size
    per_user_label_counts: bool = False  # a user record may carry its per-label counts (tp/fp/fn)
    min_group_size: int = 2  # the fewest query answers any metric record may sum
    trust_local_app: bool = True  # run the app package this node's own checkout builds
    trusted_apps: tuple[str, ...] = ()  # sha256 of further app packages (FABs) this node runs

    def validate(self, source: str) -> None:
        unknown = sorted(set(self.allowed_privacy) - set(PRIVACY_SETTINGS))
        if unknown or not self.allowed_privacy:
            raise DataError(
                f"{source}: allowed-privacy = {list(self.allowed_privacy)}; expected a non-empty list of "
                f"{list(PRIVACY_SETTINGS)}"
            )
        checks = [
            ("min-noise-multiplier", self.min_noise_multiplier >= 0, ">= 0"),
            ("max-clipping-norm", self.max_clipping_norm > 0, "> 0 (inf = no limit)"),
            ("max-epsilon", self.max_epsilon >= 0, ">= 0 (0 = no budget)"),
            ("dp-delta", 0 < self.dp_delta < 1, "0 < value < 1"),
            ("user-ids", self.user_ids in USER_ID_MODES, f"one of {list(USER_ID_MODES)}"),
            ("min-group-size", self.min_group_size >= 1, "an integer >= 1"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise DataError(f"{source}: {key} = {getattr(self, _field(key))!r}; expected {expected}")
        for digest in self.trusted_apps:
            if len(digest) != 64 or not set(digest) <= _SHA256:
                raise DataError(f"{source}: trusted-apps has {digest!r}; expected sha256 hex digests")

    # -- the privacy a run asks for ---------------------------------------------------------------
    def admit(self, setting: str, noise_multiplier: float, clipping_norm: float) -> None:
        """Refuse a privacy setting below this policy, naming the key that refuses it."""
        if setting not in self.allowed_privacy:
            raise PolicyRefusal(
                "allowed-privacy", f"privacy {setting!r} is not in {list(self.allowed_privacy)}"
            )
        noise = 0.0 if setting in UNNOISED else noise_multiplier
        if noise < self.min_noise_multiplier:
            raise PolicyRefusal(
                "min-noise-multiplier",
                f"privacy {setting!r} with noise multiplier {noise} < {self.min_noise_multiplier}",
            )
        clip = math.inf if setting in UNNOISED else clipping_norm
        if clip > self.max_clipping_norm:
            raise PolicyRefusal(
                "max-clipping-norm",
                f"privacy {setting!r} with clipping norm {clip} > {self.max_clipping_norm}",
            )


def _field(key: str) -> str:
    return key.replace("-", "_")


# What simulated nodes accept by default: every setting, the per-user breakdown the reports use, and
# the server's retry of a round a node failed in (train-retries): the simulation is its own server.
SIMULATION_POLICY = NodePolicy(
    refuse_repeated_rounds=False,
    user_ids="raw",
    per_user_history=True,
    per_user_label_counts=True,
    min_group_size=1,
)


def load_policy(path: str | Path) -> NodePolicy:
    """A policy file: flat `key = value` lines with NodePolicy's keys; unknown keys are errors."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise DataError(f"{path}: cannot read the node's privacy policy: {err}") from err
    known = {f.name.replace("_", "-"): f for f in fields(NodePolicy)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise DataError(f"{path}: unknown policy key(s) {unknown}; known keys: {sorted(known)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(NodePolicy, known[key].name)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(f"{path}: {key} = {value!r}; expected a list of strings")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise DataError(f"{path}: {key} = {value!r}; expected {type(default).__name__}")
        values[known[key].name] = value
    policy = dataclasses.replace(NodePolicy(), **values)
    policy.validate(str(path))
    return policy


def node_policy(node_config: Mapping[str, Any]) -> NodePolicy:
    """This node's policy: its operator's file, else the default of a deployed or a simulated node."""
    if node_config.get(POLICY_PATH):
        return load_policy(str(node_config[POLICY_PATH]))
    if node_config.get("data-path"):
        return NodePolicy()
    if os.environ.get(POLICY_ENV):
        return load_policy(os.environ[POLICY_ENV])
    return SIMULATION_POLICY


# -- what a release costs -----------------------------------------------------------------------------
def release_multiplier(
    setting: str, noise_multiplier: float, clipping_norm: float, num_weights: int
) -> float | None:
    """The Gaussian noise multiplier that protects one release of this node's update, relative to
    its sensitivity; None where the setting claims no DP. Matches server/privacy.py's accounting:
    local-dp is seen by the server itself (sensitivity 2C); adaptive-dp's two releases compose to at
    most what one Gaussian of multiplier z * sqrt(4/7) costs, at any number of clients; SecAgg+'s
    quantization widens the sensitivity by protocol.secagg_quantization_bound."""
    if setting in UNNOISED:
        return None
    if setting == "local-dp":
        return noise_multiplier / 2
    if setting == "adaptive-dp":
        return noise_multiplier * math.sqrt(4 / 7)
    if setting == "secagg+dp":
        return (
            noise_multiplier
            * clipping_norm
            / (clipping_norm + protocol.secagg_quantization_bound(num_weights))
        )
    return noise_multiplier


def epsilon(multipliers: list[float], delta: float) -> float:
    """(epsilon, delta) of Gaussian releases composed in RDP (no subsampling credit)."""
    if not multipliers:
        return 0.0
    from dp_accounting import dp_event  # a second of imports: only for a node that accounts
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for multiplier in multipliers:
        accountant.compose(dp_event.GaussianDpEvent(multiplier))
    return float(accountant.get_epsilon(delta))


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".policy-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class PrivacyLedger:
    """Every release of this node's shared-adapter update, on the node's disk, across runs."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        self.path = self.root / LEDGER

    def releases(self) -> list[dict]:
        if not self.path.exists():
            return []
        ledger = read_json(self.path)
        if not isinstance(ledger, dict) or not isinstance(ledger.get("releases"), list):
            raise DataError(f"{self.path}: expected an object with a 'releases' list")
        return ledger["releases"]

    def spent(self, delta: float) -> float:
        """Epsilon of every release so far; infinite once any release had no DP."""
        multipliers = [r["multiplier"] for r in self.releases()]
        return math.inf if None in multipliers else epsilon(multipliers, delta)

    def admit(
        self, policy: NodePolicy, run_id: int, server_round: int, setting: str, multiplier: float | None
    ) -> None:
        """Record one release before it is made, or refuse it: a repeated (run, round), or a release
        that would take the node past its epsilon budget."""
        with _locked(self.root):
            releases = self.releases()
            if policy.refuse_repeated_rounds and any(
                (r["run"], r["round"]) == (run_id, server_round) for r in releases
            ):
                raise PolicyRefusal(
                    "refuse-repeated-rounds", f"run {run_id} already had round {server_round} trained here"
                )
            if policy.max_epsilon > 0:
                multipliers = [r["multiplier"] for r in releases] + [multiplier]
                if None in multipliers:
                    raise PolicyRefusal(
                        "max-epsilon", f"privacy {setting!r} (or a release in {self.path}) claims no epsilon"
                    )
                spent = epsilon(multipliers, policy.dp_delta)
                if spent > policy.max_epsilon:
                    raise PolicyRefusal(
                        "max-epsilon",
                        f"this release would bring the node to epsilon {spent:.3f} > {policy.max_epsilon}",
                    )
            releases.append(
                {
                    "run": run_id,
                    "round": server_round,
                    "setting": setting,
                    "multiplier": multiplier,
                    "time": time.time(),
                }
            )
            atomic_write_json(self.path, {"version": 1, "releases": releases})


# -- pseudonyms ---------------------------------------------------------------------------------------
def node_secret(state_dir: str | Path) -> bytes:
    """The node's pseudonym key: 32 random bytes made once, readable by the node's user only."""
    root = Path(state_dir)
    path = root / SECRET
    with _locked(root):
        if not path.exists():
            atomic_write_bytes(path, secrets.token_bytes(32))
            path.chmod(0o600)
        secret = path.read_bytes()
    if len(secret) != 32:
        raise DataError(f"{path}: expected the node's 32-byte secret; delete it to make a new one")
    return secret


def pseudonym(secret: bytes, scope: str, user_id: str) -> str:
    """The user's name in one scope (one run): the same user gets the same pseudonym within a scope
    and unlinkable ones across scopes; without the node's secret it reveals nothing of the id."""
    digest = hmac.new(secret, f"{scope}\0{user_id}".encode(), hashlib.sha256).hexdigest()
    return protocol.PSEUDONYM_PREFIX + digest[:32]
