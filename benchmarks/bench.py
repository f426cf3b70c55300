"""`make bench`: this machine's own limits, and fedoppu's hot paths measured against them.

Prints ratios measured in one run (absolute times are noisy on shared machines): training tokens/s as
a percentage of the measured matmul peak (4*N FLOPs per trained token: forward plus the activation
gradients; LoRA needs no weight gradients of the base), the optimized path against the naive one,
personalization cost per user at 10 and 100 users, mixed-batch against per-user answering, wire bytes
against the model's size, memory with 100 users' adapters, and the time until the first round starts.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from client.adapters import PERSONAL, SHARED, AdapterSpec, ResidentModel
from client.inference import answer_users, generate_answers
from client.store import PersonalAdapterStore
from client.training import collate, encode_example, train_slot
from common.benchmark import BenchmarkConfig, make_benchmark
from common.model import load_base_model
from common.prompts import build_prompt, target_text
from common.tasks import get_task

console = Console()
ROWS: list[tuple[str, str, str]] = []


def report(what: str, value: str, ratio: str = "") -> None:
    ROWS.append((what, value, ratio))
    console.print(f"  {what}: {value} {ratio}")


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype: torch.dtype, size: int) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    return 2 * size**3 / best_of(lambda: a @ b, 5)


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
    ids, attention, mask = collate(batch, resident.tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    labels[:, 1:][mask[:, :-1]] = ids[:, 1:][mask[:, :-1]]
    context = (
        torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    )
    with context:
        logits = resident.peft(input_ids=ids, attention_mask=attention).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss.backward()


def bench_training(resident, data, params: int, peaks: dict[str, float]) -> None:
    console.rule("training (LoRA r=8 on q_proj, v_proj; batch 8)")
    resident.load(SHARED, resident.fresh(SHARED, 0))
    for autocast in (False, True):
        name = "bf16" if autocast else "fp32"
        train_slot(
            resident, SHARED, data, steps=1, batch_size=8, learning_rate=1e-3, seed=0, autocast_bf16=autocast
        )
        start = time.perf_counter()
        result = train_slot(
            resident, SHARED, data, steps=6, batch_size=8, learning_rate=1e-3, seed=1, autocast_bf16=autocast
        )
        rate = result.tokens / (time.perf_counter() - start)
        percent = 100 * rate * 4 * params / peaks[name]
        params_ = resident.trainable(SHARED)
        optimizer = torch.optim.AdamW(params_, lr=1e-3)
        batch = data[:8]
        tokens = sum(len(e.input_ids) for e in batch) * 3
        start = time.perf_counter()
        for _ in range(3):
            optimizer.zero_grad()
            naive_step(resident, batch, autocast)
            optimizer.step()
        naive = tokens / (time.perf_counter() - start)
        resident.peft.requires_grad_(False)
        report(
            f"train tokens/s {name}",
            f"{rate:,.0f}",
            f"= {percent:.0f}% of {name} peak; {rate / naive:.2f}x naive ({naive:,.0f})",
        )


def bench_personalization(resident, data, spec) -> None:
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
                    autocast_bf16=True,
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


def bench_answering(resident, task, dataset) -> None:
    console.rule("answering: 8 users x 4 queries, each user with a personal adapter")
    prompts = [[build_prompt(task, q.input) for q in user.queries[:4]] for user in dataset.users[:8]]
    states = [resident.fresh(PERSONAL, u) for u in range(8)]
    options = {"max_new_tokens": task.max_new_tokens, "max_prompt_tokens": 320, "autocast_bf16": True}
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
        "answers/s mixed batch",
        f"{answers / mixed:.1f}",
        f"= {looped / mixed:.2f}x the per-user loop ({answers / looped:.1f}/s; target >= 2x)",
    )


def bench_wire(resident, model_bytes: int) -> None:
    console.rule("wire")
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        size = sum(t.to(dtype).numel() * t.to(dtype).element_size() for t in resident.state(SHARED).values())
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-simulate", action="store_true", help="skip the time-to-first-round measurement"
    )
    args = parser.parse_args()
    console.rule(
        f"this machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    peaks = {"fp32": matmul_peak(torch.float32, 4096), "bf16": matmul_peak(torch.bfloat16, 2048)}
    report("matmul peak fp32 (4096^2)", f"{peaks['fp32'] / 1e9:,.0f} GFLOP/s")
    report(
        "matmul peak bf16 (2048^2)",
        f"{peaks['bf16'] / 1e9:,.0f} GFLOP/s",
        f"= {peaks['bf16'] / peaks['fp32']:.1f}x fp32",
    )
    model, tokenizer = load_base_model()
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spec = AdapterSpec()
    resident = ResidentModel(model, tokenizer, spec)
    task, dataset, data = examples(tokenizer)
    bench_training(resident, data, params, peaks)
    bench_personalization(resident, data, spec)
    bench_answering(resident, task, dataset)
    bench_wire(resident, model_bytes)
    if not args.skip_simulate:
        bench_first_round()
    table = Table(title="fedoppu benchmark")
    for column in ("measure", "value", "ratio"):
        table.add_column(column)
    for row in ROWS:
        table.add_row(*row)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
