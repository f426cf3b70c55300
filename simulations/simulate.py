"""`fedoppu simulate`: one or two federations on this machine, then the report.

The main federation runs every requested method; `centralized` (OPPU's original setting) runs as a
second federation with every user's history pooled on a single node and the same total number of
shared-adapter steps, so it is the non-private reference on the same users, queries and seeds.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

from client.users import simulated_state_root
from common.cli import console
from common.config import METHODS, VALIDATION, ConfigError, RunConfig, default_config_values
from common.io import atomic_write_json, read_json
from common.loaders import load_run_dataset, num_partitions
from common.methods import METHODS as METHOD_SPECS
from common.precision import Precision, compute_precision
from server.sampling import ClientSampling
from simulations.engine import run_federation
from simulations.engine_options import DEFAULT_ENGINE, EngineOptions
from simulations.gates import gate_decisions
from simulations.placement import place_clients
from simulations.report import write_report, write_seeds_report
from simulations.variants import write_variants_report

ALL = "all"


def expand_methods(text: str) -> tuple[str, bool]:
    """`all` -> every federated method plus the centralized reference; otherwise the list as given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if ALL in names:
        return ",".join(METHODS), True
    centralized = "centralized" in names
    return ",".join(n for n in names if n != "centralized"), centralized


def new_run_dir(results_dir: str | Path, task: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(results_dir) / f"{stamp}-{task}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(results_dir) / f"{stamp}-{task}-{suffix}"
    return path


def prepare(
    config: RunConfig, run_dir: Path, centralized: bool, engine: EngineOptions
) -> tuple[RunConfig, int, Precision]:
    """Resolve the task and node count from the data and the compute precision on this machine, and
    record the exact config of the run and where its clients compute."""
    dataset = load_run_dataset(config)
    config = config.replace(task=config.task or dataset.task, run_dir=str(run_dir))
    nodes = num_partitions(len(dataset.users), config.users_per_client)
    if config.min_nodes > nodes:
        raise ConfigError(f"min-nodes = {config.min_nodes}, but this simulation has {nodes} node(s)")
    precision = compute_precision(config)
    atomic_write_json(
        run_dir / "config.json",
        {
            "run_config": config.to_flower(),
            "num_supernodes": nodes,
            "num_users": len(dataset.users),
            "centralized": centralized,
            "precision": precision.record(),
            "device": engine.client_device,
            "gpus_per_client": engine.gpus_per_client,
        },
    )
    return config, nodes, precision


def simulate(config: RunConfig, *, centralized: bool, engine: EngineOptions = DEFAULT_ENGINE) -> Path:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config, engine = place_clients(config, engine)
    config, nodes, precision = prepare(config, run_dir, centralized, engine)
    started = time.perf_counter()
    where = engine.client_device
    if engine.gpus_per_client:
        where = f"GPU, {engine.gpus_per_client:g} of one per client"
    if config.split == VALIDATION:
        console.print(
            "[bold]validation split[/]: each user's newest history items are the queries; no test query is read"
        )
    methods = ",".join(config.method_list + (["centralized"] if centralized else []))
    console.print(
        f"[bold]fedoppu[/] {config.task}: {nodes} clients, {config.num_rounds} rounds, methods {methods}, "
        f"{precision.name} on {where}"
    )
    console.print(f"results: {run_dir}")
    # Every simulated client runs on this machine: they compute in the precision resolved here, on the
    # GPU Ray assigns to their worker or on the CPU.
    config = config.replace(autocast_bf16=precision.bf16, device=engine.client_device)
    if config.method_list:
        run_federation(config, nodes, engine)
    if centralized:
        run_centralized(config, nodes, engine)
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path)
    previous = metrics.get("wall_seconds", 0.0) if config.resume else 0.0
    metrics["wall_seconds"] = previous + time.perf_counter() - started
    if gates := gate_decisions(simulated_state_root(config, run_dir), config.method_list):
        metrics["gates"] = gates
    atomic_write_json(metrics_path, metrics)
    write_report(run_dir, console)
    return run_dir


# Keys a run sets or resolves for itself when it starts: not part of what makes two runs the same.
RESOLVED_KEYS = ("run-dir", "resume", "device")


def finished_run(
    config: RunConfig, statuses: tuple[str, ...] = ("complete",), ignored: Collection[str] = ()
) -> bool:
    """Whether `config.run_dir` holds a finished run of this config, to be kept rather than run again.
    A finished run of another config there is refused, naming the keys that differ: taking it for this
    one would report numbers of a run nobody asked for, and running over it would lose it. `ignored`:
    keys the run's methods never read; the keys the run never reads (RunConfig.unread_keys) are ignored too."""
    run_dir = Path(config.run_dir)
    metrics = run_dir / "metrics.json"
    if not (metrics.exists() and read_json(metrics).get("status") in statuses):
        return False
    recorded_path = run_dir / "config.json"
    recorded = read_json(recorded_path).get("run_config", {}) if recorded_path.exists() else {}
    wanted = config.to_flower()
    ignored = {*ignored, *config.unread_keys}
    differing = [
        key
        for key, value in recorded.items()
        if key in wanted
        and key not in RESOLVED_KEYS
        and key not in ignored
        and not (key == "task" and not wanted[key])  # "" = the data's own task, recorded resolved
        and wanted[key] != value
    ]
    if differing:
        changes = "; ".join(f"{key} = {recorded[key]!r} there, {wanted[key]!r} asked" for key in differing)
        raise ConfigError(
            f"{run_dir} holds a finished run of another config ({changes}): "
            "choose another --run-dir, or move that run away to run this one there"
        )
    return True


def simulate_seeds(
    config: RunConfig, seeds: int, *, centralized: bool, engine: EngineOptions = DEFAULT_ENGINE
) -> Path:
    """The same run with seeds seed, seed+1, ... in <run-dir>/seed-<s>/, then each number's mean and
    spread over them (<run-dir>/seeds.json, seeds.csv). With the built-in benchmark the seed also draws
    the users, so the spread covers data as well as training. A finished seed is not run again."""
    run_dir = Path(config.run_dir)
    seed_dirs = {}
    for seed in range(config.seed, config.seed + seeds):
        seed_dir = run_dir / f"seed-{seed}"
        seed_config = config.replace(seed=seed, run_dir=str(seed_dir))
        if not finished_run(seed_config):
            console.rule(f"[bold]seed {seed}[/] ({seed - config.seed + 1} of {seeds})")
            simulate(seed_config, centralized=centralized, engine=engine)
        seed_dirs[seed] = seed_dir
    write_seeds_report(run_dir, seed_dirs, console)
    return run_dir


def simulate_variants(
    configs: dict[str, RunConfig], run_dir: Path, *, centralized: bool, engine: EngineOptions = DEFAULT_ENGINE
) -> Path:
    """One run per variant ({name: its config, run-dir <run_dir>/<name>}), then their comparison with
    the first (simulations/variants.py: <run_dir>/variants.json, variants.csv, variants.png). A finished
    variant is not run again."""
    variant_dirs = {}
    for index, (name, config) in enumerate(configs.items()):
        variant_dir = Path(config.run_dir)
        if not finished_run(config):
            console.rule(f"[bold]{name}[/] ({index + 1} of {len(configs)})")
            simulate(config, centralized=centralized, engine=engine)
        variant_dirs[name] = variant_dir
    write_variants_report(run_dir, variant_dirs, baseline=next(iter(configs)), console=console)
    return run_dir


def centralized_methods(method_list: list[str]) -> list[str]:
    """What the centralized reference reports for a run of these methods: its shared adapter, and
    pooled OPPU (`centralized`) only when a method puts a personal adapter on the shared one."""
    personalized = any(METHOD_SPECS[m].shared and METHOD_SPECS[m].personal for m in method_list)
    return ["centralized-shared", "centralized"] if personalized else ["centralized-shared"]


def centralized_config(config: RunConfig, users: int, nodes: int) -> RunConfig:
    """The reference: plain training of the shared adapter on every history pooled. Its one node
    takes as many steps per round as the clients a round of the federation trains (on average, under
    Poisson sampling), so both spend the same client steps, and the server keeps that
    node's adapter as it is (FedAvg of one node): a server optimizer (fedadam, fedavgm) or FedProx's
    pull towards the round's start would make it something other than plain training. It personalizes
    (`centralized`, pooled OPPU) only when the run asks for a method with a personal adapter on the
    shared one: a comparison of shared adapters alone skips the hours of per-user training."""
    personalized = "centralized" in centralized_methods(config.method_list)
    per_round = ClientSampling.from_config(config, nodes).expected
    return config.replace(
        users_per_client=users,
        local_steps=max(1, round(config.local_steps * per_round)),
        fraction_train=1.0,  # its one node, every round
        clients_per_round=0,
        sample_rate=0.0,
        strategy="fedavg",
        methods="shared,oppu" if personalized else "shared",
        run_dir=str(Path(config.run_dir) / "centralized"),
        state_dir="",
        min_nodes=1,  # its one node
        # A bound meant for honest clients' few steps would refuse the pooled node's many: its update
        # is the work of every node's steps together (105.8 against 100 on commit-subjects-flower at
        # learning rate 0.02), and the reference has no other node to defend.
        max_update_norm=0.0,
    )


def run_centralized(config: RunConfig, nodes: int, engine: EngineOptions) -> None:
    """All histories on one node, as many shared-adapter steps per round as all clients together."""
    users = len(load_run_dataset(config).users)
    central = centralized_config(config, users, nodes)
    central_dir = Path(central.run_dir)
    # Its size, before it starts: on 64 users pooled OPPU alone is each user's personal training in turn.
    then = f", then pooled OPPU for {users} users one after another" if "oppu" in central.method_list else ""
    console.print(
        f"[bold]centralized reference[/]: {users} users pooled on one node, {central.num_rounds} rounds "
        f"of {central.local_steps} steps{then}"
    )
    recorded = central_dir / "metrics.json"
    if not (config.resume and recorded.exists() and read_json(recorded).get("status") == "complete"):
        run_federation(central, 1, engine)
    pooled = read_json(central_dir / "metrics.json")
    main_path = Path(config.run_dir) / "metrics.json"
    main = read_json(main_path) if main_path.exists() else {"methods": {}, "rounds": []}
    main["methods"]["centralized-shared"] = pooled["methods"]["shared"]
    if "oppu" in pooled["methods"]:
        main["methods"]["centralized"] = pooled["methods"]["oppu"]
    # A run of the reference alone (`--methods centralized`) is as finished as its pooled node.
    for key in ("task", "primary_metric", "higher_is_better", "history", "status"):
        main.setdefault(key, pooled[key])
    atomic_write_json(main_path, main)


def resume(run_dir: str | Path, engine: EngineOptions = DEFAULT_ENGINE) -> Path:
    """Continue an interrupted run from its last checkpointed round, with its recorded config."""
    run_dir = Path(run_dir)
    recorded = read_json(run_dir / "config.json")
    # Keys added to the app after the run was recorded take today's defaults.
    values = {**default_config_values(), **recorded["run_config"]}
    config = RunConfig.from_mapping(values, str(run_dir / "config.json")).replace(resume=True)
    return simulate(config, centralized=bool(recorded.get("centralized")), engine=engine)
