"""`make bench`: this machine's own limits, and fedoppu's hot paths measured against them.

Prints ratios measured in one run (absolute times are noisy on shared machines): the precision
`autocast-bf16 = "auto"` picks here and why, training tokens/s as a percentage of the measured matmul
peak (4*N FLOPs per trained token: forward plus the activation gradients; LoRA needs no weight
gradients of the base), the optimized path against the naive one, one client update against the same
update done the way Flower's FlowerTune LLM template does it, one 64-item user's personalization with
adapters on the top layers against every layer, personalization cost per user at 10 and 100 users,
mixed-batch against per-user answering, wire bytes against the model's size, memory with 100 users'
adapters, and the time until the first round starts. A precision this CPU runs slowly is measured
briefly and skipped after, so the bench takes minutes on every CPU. With `--against COMMIT` it also
times two whole default `fedoppu simulate` runs, at COMMIT and here.

All of that runs on the CPU (`device = "cpu"`), as on a machine without a GPU. Where torch sees a
CUDA device, the GPU that `device = "auto"` picks is measured after it: its own matmul peaks, training
tokens/s as a percentage of them and as a multiple of the CPU path's above, and answers per second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from rich.console import Console
from rich.table import Table

from benchmarks.flowertune import flowertune_client_update
from client.hidden import HiddenStates
from client.inference import answer_users, generate_answers
from client.prefill import PromptPrefills
from client.resident import PERSONAL, SHARED, ResidentModel
from client.store import PersonalAdapterStore
from client.training import Example, bucketed_batches, collate, encode_example, shared_prefix_len, train_slot
from common import protocol
from common.adapters import AdapterSpec, AdapterSpecs, StateDict, initial_adapter
from common.config import PROJECT_DIR, RunConfig, load_run_config
from common.device import describe_device, resolve_device
from common.model import load_base_model
from common.precision import Precision, compute_precision, cpu_description
from common.prompts import build_prompt, target_text
from common.synthetic import BenchmarkConfig, make_benchmark
from common.tasks import get_task

console = Console()
ROWS: list[tuple[str, str, str]] = []
SLOW_CALL_SECONDS = 1.0
# A simulated client gets one core (Ray's default for a task of one CPU): the paths are timed so, and
# one thread is also what keeps timings steady while other processes share the cores.
CLIENT_THREADS = 1
CPU = torch.device("cpu")


def report(what: str, value: str, ratio: str = "") -> None:
    ROWS.append((what, value, ratio))
    console.print(f"  {what}: {value} {ratio}")


def synchronize(device: torch.device) -> None:
    """A GPU runs its kernels asynchronously: a timing ends when they have finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(
    dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), device: torch.device = CPU
) -> tuple[float, int]:
    """Best FLOP/s of square matmuls over growing sizes, after a warm-up call (oneDNN and cuBLAS pick
    their kernels on the first ones). A call over a second ends the growth: a precision this CPU has no
    fast kernels for (bf16 at ~1 GFLOP/s without AVX512_BF16) is measured on one size, in seconds. On
    a GPU each timed call runs 20 matmuls, so launch latency does not count. Returns (FLOP/s, size)."""
    best = (0.0, 0)
    per_call = 20 if device.type == "cuda" else 1
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)

        def call(a=a, b=b) -> None:
            for _ in range(per_call):
                torch.matmul(a, b)
            synchronize(device)

        warm_up = best_of(call, 1)
        if warm_up > SLOW_CALL_SECONDS:
            return max(best, (2 * size**3 * per_call / warm_up, size))
        best = max(best, (2 * size**3 * per_call / best_of(call, 4), size))
    return best


def examples(tokenizer, users: int = 8):
    dataset = make_benchmark(BenchmarkConfig(num_users=users))
    task = get_task(dataset.task)
    return (
        task,
        dataset,
        [
            encode_example(tokenizer, build_prompt(task, item.input), target_text(task, item), 320)
            for user in dataset.users
            for item in user.history
        ],
    )


def naive_step(resident: ResidentModel, batch, autocast: bool) -> None:
    """Full logits over every position and no length bucketing: the straightforward HF loss."""
    ids, attention, mask = (t.to(resident.device) for t in collate(batch, resident.tokenizer.pad_token_id))
    labels = torch.full_like(ids, -100)
    labels[:, 1:][mask[:, :-1]] = ids[:, 1:][mask[:, :-1]]
    with resident.autocast(autocast):
        logits = resident.peft(input_ids=ids, attention_mask=attention).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss.backward()


@dataclass(frozen=True)
class FlopCount:
    """The issue's convention counts 4*N FLOPs per example token (forward plus activation gradients).
    Fewer are executed: the embedding is a lookup, a batch's shared prompt prefix runs once, and the
    tied 49k-row lm_head runs only at positions that predict a target token."""

    params: int
    layer_params: int  # the decoder layers' weights: every computed token goes through them
    head_params: int

    def convention(self, tokens: int) -> float:
        return 4 * self.params * tokens

    def executed(self, batches: list[list[Example]]) -> float:
        computed = sum(
            sum(len(e.input_ids) for e in b) - (len(b) - 1) * shared_prefix_len(b) for b in batches
        )
        targets = sum(len(e.input_ids) - e.prompt_len for b in batches for e in b)
        return 4 * (self.layer_params * computed + self.head_params * targets)


def flop_count(model) -> FlopCount:
    backbone = getattr(model, model.base_model_prefix)
    return FlopCount(
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in backbone.layers.parameters()),
        model.get_output_embeddings().weight.numel(),
    )


def bench_training(
    resident, data, flops: FlopCount, peaks: dict[str, float], precisions: list[str], where: str = ""
) -> dict[str, float]:
    """Training tokens/s per precision, against the peaks measured on the same device."""
    console.rule(f"{where}training (LoRA r=8 on q_proj, v_proj; batch 8)")
    rates = {}
    resident.load(SHARED, resident.fresh(SHARED, 0))
    lengths = [len(e.input_ids) for e in data]
    batches = [[data[i] for i in b] for b in bucketed_batches(lengths, batch_size=8, steps=6, seed=1)]
    for name in precisions:
        autocast = name == "bf16"
        train_slot(
            resident, SHARED, data, steps=1, batch_size=8, learning_rate=1e-3, seed=0, autocast_bf16=autocast
        )
        start = time.perf_counter()
        result = train_slot(
            resident, SHARED, data, steps=6, batch_size=8, learning_rate=1e-3, seed=1, autocast_bf16=autocast
        )
        seconds = time.perf_counter() - start
        rate = result.tokens / seconds
        params_ = resident.trainable(SHARED)
        optimizer = torch.optim.AdamW(params_, lr=1e-3)
        batch = data[:8]
        tokens = sum(len(e.input_ids) for e in batch) * 3
        start = time.perf_counter()
        for _ in range(3):
            optimizer.zero_grad()
            naive_step(resident, batch, autocast)
            optimizer.step()
        synchronize(resident.device)
        naive = tokens / (time.perf_counter() - start)
        resident.peft.requires_grad_(False)
        convention = 100 * flops.convention(result.tokens) / seconds / peaks[name]
        executed = 100 * flops.executed(batches) / seconds / peaks[name]
        report(
            f"{where}train tokens/s {name}, adapters on every layer",
            f"{rate:,.0f}",
            f"= {convention:.0f}% of {name} peak at 4*N FLOPs per example token, {executed:.0f}% "
            f"counting the FLOPs executed; {rate / naive:.2f}x naive ({naive:,.0f})",
        )
        rates[name] = rate
    return rates


def _train_message(state: StateDict, server_round: int) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: v.float() for k, v in state.items()}),
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: server_round}),
        }
    )
    return Message(content, dst_node_id=1, message_type=protocol.TRAIN)


def bench_client_update(config: RunConfig, precision: Precision) -> None:
    """fedoppu's ClientApp `train` handler against a FlowerTune-style client on the same client (the
    default demo's partition 0), the same adapter, steps, batch size and learning rate."""
    console.rule(
        f"one client update: {config.local_steps} steps of batch {config.batch_size}, {config.task}, "
        f"{precision.name}, adapter-layers = {config.adapter_layers}"
    )
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from client import client_app

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    spec = AdapterSpecs.from_config(config).shared
    with tempfile.TemporaryDirectory() as tmp:
        config = config.replace(run_dir=tmp, autocast_bf16=precision.bf16)
        context = Context(1, 1, {"partition-id": 0}, RecordDict(), config.to_flower())
        start = initial_adapter(config.model, config.dtype, spec, config.seed)
        seconds = {}
        for server_round, label in ((1, "first"), (2, "later"), (3, "deployed")):
            if label == "deployed":  # as a deployed node's new ClientApp process: nothing in memory
                for cached in (client_app.resident_model, client_app.hidden_states, client_app._node):
                    cached.cache_clear()
            started = time.perf_counter()
            reply = client_app.train(_train_message(start, server_round), context)
            seconds[label] = time.perf_counter() - started
        loss = reply.content[protocol.METRICS]["train-loss"]
        node = client_app.setup(context)[2]
    user = node.contexts[0]
    texts = [build_prompt(user.task, item.input) + target_text(user.task, item) for item in user.user.history]
    # The template's LoraConfig names no target modules: peft's default for llama, q_proj and v_proj,
    # on every layer.
    peer_spec = AdapterSpec(r=spec.r, alpha=spec.alpha)
    _, peer = flowertune_client_update(
        config.model,
        peer_spec,
        initial_adapter(config.model, config.dtype, peer_spec, config.seed),
        texts,
        steps=config.local_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        max_len=config.max_seq_len,
        bf16=precision.bf16,
        seed=config.seed,
    )
    report("FlowerTune-style client update s (model load + Trainer, loss on every token)", f"{peer:.1f}")
    report(
        "fedoppu client update s, first round in this process (model load, states below the adapters computed)",
        f"{seconds['first']:.1f}",
        f"= {peer / seconds['first']:.1f}x faster than FlowerTune-style",
    )
    report(
        "fedoppu client update s, a later round (target >= 5x)",
        f"{seconds['later']:.1f}",
        f"= {peer / seconds['later']:.1f}x faster than FlowerTune-style (train loss {loss:.3f})",
    )
    report(
        "fedoppu client update s, a later round in a new process (model load, states from the node's disk)",
        f"{seconds['deployed']:.1f}",
        f"= {peer / seconds['deployed']:.1f}x faster than FlowerTune-style",
    )


def bench_personal_user(config: RunConfig, precision: Precision) -> None:
    """One user with 64 history items, 4 epochs (32 steps of 8): OPPU's adapters (LoRA on q_proj and
    v_proj of every layer, the only layout before adapter-layers) against the run config's, with the
    states below the adapted layers computed in the same call (a user personalized first) and already
    known (after the shared rounds trained on the same prompts, as in a run)."""
    console.rule(f"personalizing one 64-item user, 4 epochs of batch 8, {precision.name}")
    ours = AdapterSpecs.from_config(config).personal
    if not ours.layers:
        console.print('  adapter-layers = "all": no adapters on the top layers to compare')
        return
    dataset = make_benchmark(BenchmarkConfig(num_users=1, min_history=64, max_history=64))
    task = get_task(dataset.task)
    seconds = {}
    for name, spec in (("every layer", AdapterSpec()), ("top layers", ours)):
        model, tokenizer = load_base_model()
        resident = ResidentModel(model, tokenizer, spec)
        data = [
            encode_example(tokenizer, build_prompt(task, item.input), target_text(task, item), 320)
            for item in dataset.users[0].history
        ]
        hidden = HiddenStates(resident, 2**30) if spec.layers else None
        for run in ("cold", "warm") if hidden is not None else ("cold",):
            resident.load(PERSONAL, resident.fresh(PERSONAL, 0))
            resident.use(personal=True)
            started = time.perf_counter()
            train_slot(
                resident,
                PERSONAL,
                data,
                steps=32,
                batch_size=8,
                learning_rate=config.personal_learning_rate,
                seed=0,
                autocast_bf16=precision.bf16,
                hidden=hidden,
            )
            seconds[(name, run)] = time.perf_counter() - started
        del model, resident
    every = seconds[("every layer", "cold")]
    report("personalize a 64-item user s, LoRA on q_proj, v_proj of every layer", f"{every:.1f}")
    layout = f"adapter-layers = {config.adapter_layers}, {config.target_modules}"
    report(
        f"  {layout}, states below computed in the call",
        f"{seconds[('top layers', 'cold')]:.1f}",
        f"= {every / seconds[('top layers', 'cold')]:.1f}x faster",
    )
    report(
        f"  {layout}, states below already known (target >= 3x)",
        f"{seconds[('top layers', 'warm')]:.1f}",
        f"= {every / seconds[('top layers', 'warm')]:.1f}x faster",
    )


def bench_personalization(resident, data, spec, bf16: bool) -> None:
    """Per-user cost (load stored adapter, swap into the slot, 1 train step, save) with 10 and with 100
    users on the node: weight copy into one slot and a manifest keep it flat as users accumulate."""
    console.rule("personalization cost per user, 10 vs 100 users on the node")
    per_user = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (10, 100):
            store = PersonalAdapterStore(Path(tmp) / str(count))
            for user in range(count):  # the node's existing users
                store.save(
                    "oppu",
                    f"u{user}",
                    resident.fresh(PERSONAL, user),
                    spec.peft_config(),
                    shared_digest="x",
                    data_fingerprint="y",
                )
            start = time.perf_counter()
            for user in range(0, count, count // 10):
                resident.load(PERSONAL, store.load("oppu", f"u{user}")[1])
                resident.use(personal=True)
                train_slot(
                    resident,
                    PERSONAL,
                    data[user % 40 : user % 40 + 2],
                    steps=1,
                    batch_size=2,
                    learning_rate=1e-3,
                    seed=user,
                    autocast_bf16=bf16,
                )
                store.save(
                    "oppu",
                    f"u{user}",
                    resident.state(PERSONAL),
                    spec.peft_config(),
                    shared_digest="x2",
                    data_fingerprint="y",
                )
            per_user[count] = (time.perf_counter() - start) / 10
        report("personalize s/user, 10 users", f"{per_user[10]:.3f}")
        report(
            "personalize s/user, 100 users",
            f"{per_user[100]:.3f}",
            f"= {per_user[100] / per_user[10]:.2f}x the 10-user cost (target <= 1.2x)",
        )
        states = [store.load("oppu", f"u{u}")[1] for u in range(100)]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tensors = sum(t.numel() * 4 for s in states for t in s.values()) / 2**20
        report(
            "process peak RSS, 100 users' adapters loaded",
            f"{rss:,.0f} MB",
            f"({tensors:.0f} MB of it adapter tensors)",
        )


def bench_answering(resident, task, dataset, bf16: bool, where: str = "") -> float:
    """Answers/s in mixed batches, against answering one user and one query at a time."""
    console.rule(f"{where}answering: 8 users x 4 queries, each user with a personal adapter")
    prompts = [[build_prompt(task, q.input) for q in user.queries[:4]] for user in dataset.users[:8]]
    states = [resident.fresh(PERSONAL, u) for u in range(8)]
    options = {"max_new_tokens": task.max_new_tokens, "max_prompt_tokens": 320, "autocast_bf16": bf16}
    mixed = best_of(lambda: answer_users(resident, prompts, states, **options), 2)

    def loop():
        for user_prompts, state in zip(prompts, states, strict=True):
            resident.load(PERSONAL, state)
            resident.use(personal=True)
            for prompt in user_prompts:
                generate_answers(resident, [prompt], **options)

    looped = best_of(loop, 2)
    answers = sum(len(p) for p in prompts)
    report(
        f"{where}answers/s mixed batch",
        f"{answers / mixed:.1f}",
        f"= {looped / mixed:.2f}x the per-user loop ({answers / looped:.1f}/s; target >= 2x)",
    )
    if resident.specs.first_layer:  # the same queries again: their prefill below the adapters replayed
        prefills = PromptPrefills(resident, limit_bytes=2**32)
        answer_users(resident, prompts, states, prefills=prefills, **options)  # records
        replayed = best_of(lambda: answer_users(resident, prompts, states, prefills=prefills, **options), 2)
        report(
            f"{where}answers/s mixed batch, asked again",
            f"{answers / replayed:.1f}",
            f"= {mixed / replayed:.2f}x the first time (prefill below layer {resident.specs.first_layer} replayed)",
        )
    return answers / mixed


def bench_gpu(data, flops: FlopCount, task, dataset, cpu_train: float, cpu_answers: float) -> None:
    """The GPU `device = "auto"` picks: its own matmul peaks, then the CPU sections' training and
    answering on it, in the precision `autocast-bf16 = "auto"` picks there."""
    config = load_run_config()
    device = resolve_device(config.device)
    precision = compute_precision(config)
    console.rule(f"GPU: {describe_device(device)}")
    console.print(f"  {precision.reason}")
    peaks: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name], size = matmul_peak(dtype, (2048, 4096, 8192), device)
        ratio = (
            f"= {peaks['bf16'] / peaks['fp32']:.1f}x fp32"
            if name == "bf16"
            else "(TF32 off, torch's default)"
        )
        report(f"GPU matmul peak {name} (best of {size}^2)", f"{peaks[name] / 1e12:,.1f} TFLOP/s", ratio)
    model, tokenizer = load_base_model()
    resident = ResidentModel(model, tokenizer, AdapterSpec(), device)
    name = "bf16" if precision.bf16 else "fp32"
    rate = bench_training(resident, data, flops, peaks, [name], where="GPU ")[name]
    report(
        f"GPU train tokens/s {name} over the CPU path",
        f"{rate / cpu_train:.1f}x",
        f"(CPU: {cpu_train:,.0f}/s on {CLIENT_THREADS} thread)",
    )
    answers = bench_answering(resident, task, dataset, precision.bf16, where="GPU ")
    report("GPU answers/s over the CPU path", f"{answers / cpu_answers:.1f}x", f"(CPU: {cpu_answers:.1f}/s)")


def bench_wire(config: RunConfig, model_bytes: int) -> None:
    spec = AdapterSpecs.from_config(config).shared
    console.rule(
        f"wire: the shared adapter, r {spec.r} on {','.join(spec.target_modules)}, layers {spec.layers or 'all'}"
    )
    shared = initial_adapter(config.model, config.dtype, spec, config.seed)
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        size = sum(t.numel() * dtype.itemsize for t in shared.values())
        report(
            f"shared adapter bytes/client/round {name}",
            f"{size / 1e6:.2f} MB",
            f"= {100 * size / model_bytes:.2f}% of the model's {model_bytes / 1e6:.0f} MB (target <= 0.5%)",
        )


def bench_first_round() -> None:
    console.rule("time until the first round of `fedoppu simulate` starts")
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "simulations.cli",
            "simulate",
            "--run-dir",
            tmp,
            "--set",
            "methods=shared",
            "--set",
            "num-rounds=1",
            "--flower-log",  # its "[ROUND 1/" line marks the start
        ]
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            for line in process.stdout:
                if re.search(r"\[ROUND 1/", line):
                    report("seconds until round 1 starts", f"{time.perf_counter() - start:.1f}")
                    break
        finally:
            os.killpg(process.pid, 15)
            process.wait(30)


def _timed_simulate(root: Path, run_dir: Path, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Wall seconds of a default `fedoppu simulate` run from `root`, and each method's primary metric."""
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(
            [sys.executable, "-m", "simulations.cli", "simulate", "--run-dir", str(run_dir)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    primary = metrics["primary_metric"]
    return wall, {name: m["overall"][primary] for name, m in metrics["methods"].items()}


def bench_simulate_against(ref: str) -> None:
    """The default `fedoppu simulate` at git commit `ref` (from a temporary worktree, with its own model
    cache, built before timing) and in this checkout, back to back on the same machine."""
    console.rule(f"default `fedoppu simulate`: {ref} against this checkout (two whole runs)")
    with tempfile.TemporaryDirectory() as tmp:
        tree, cache = Path(tmp) / "ref", Path(tmp) / "cache"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=PROJECT_DIR, check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree), "FEDOPPU_CACHE": str(cache)}
            subprocess.run(
                [sys.executable, "-c", "from common.model import load_base_model; load_base_model()"],
                cwd=tree,
                env=env,
                check=True,
                capture_output=True,
            )
            with console.status(f"running the default simulate at {ref}"):
                before, before_metrics = _timed_simulate(tree, Path(tmp) / "before", env)
            env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
            with console.status("running the default simulate in this checkout"):
                after, after_metrics = _timed_simulate(PROJECT_DIR, Path(tmp) / "after", env)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=PROJECT_DIR, check=False)
    report(f"default simulate wall s at {ref}", f"{before:.0f}")
    report(
        "default simulate wall s, this checkout",
        f"{after:.0f}",
        f"= {before / after:.2f}x shorter (target >= 2x)",
    )
    for name, value in after_metrics.items():
        report(f"  {name}", f"{value:.3f}", f"(was {before_metrics.get(name, float('nan')):.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-simulate", action="store_true", help="skip the time-to-first-round measurement"
    )
    parser.add_argument(
        "--against",
        metavar="COMMIT",
        help="also time two whole default `fedoppu simulate` runs, at COMMIT and in this checkout "
        "(about 20 minutes on 2 cores)",
    )
    args = parser.parse_args()
    console.rule(
        f"this machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    console.print(f"  CPU: {cpu_description()}")
    config = load_run_config(overrides=['device="cpu"'])  # the GPU, if any, is measured last
    precision = compute_precision(config)
    report("precision (autocast-bf16 = auto)", precision.name, f"bf16 measured {precision.speedup:.2f}x fp32")
    console.print(f"  {precision.reason}")
    peaks: dict[str, float] = {}
    for threads in sorted({torch.get_num_threads(), CLIENT_THREADS}, reverse=True):
        torch.set_num_threads(threads)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[name], size = matmul_peak(dtype)
            ratio = f"= {peaks['bf16'] / peaks['fp32']:.1f}x fp32" if name == "bf16" else ""
            if name == "bf16" and not precision.bf16:
                ratio += " (bf16 is not used here: measured briefly, bf16 training skipped below)"
            report(
                f"matmul peak {name}, {threads} thread(s) (best of {size}^2)",
                f"{peaks[name] / 1e9:,.0f} GFLOP/s",
                ratio,
            )
    console.print(f"  fedoppu's paths below run as a simulated client does: {CLIENT_THREADS} thread")
    model, tokenizer = load_base_model()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spec = AdapterSpec()
    task, dataset, data = examples(tokenizer)
    flops = flop_count(model)
    resident = ResidentModel(model, tokenizer, spec)
    train_rates = bench_training(
        resident, data, flops, peaks, ["fp32", "bf16"] if precision.bf16 else ["fp32"]
    )
    bench_client_update(config, precision)
    bench_personal_user(config, precision)
    bench_personalization(resident, data, spec, precision.bf16)
    answers = bench_answering(resident, task, dataset, precision.bf16)
    bench_wire(config, model_bytes)
    if torch.cuda.is_available():
        bench_gpu(data, flops, task, dataset, train_rates["bf16" if precision.bf16 else "fp32"], answers)
    if not args.skip_simulate:
        bench_first_round()
    if args.against:
        bench_simulate_against(args.against)
    table = Table(title="fedoppu benchmark")
    for column in ("measure", "value", "ratio"):
        table.add_column(column)
    for row in ROWS:
        table.add_row(*row)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
