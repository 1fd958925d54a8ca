"""``python -m bench.train``: train a small decoder-only language model twice from the same seed, once
with ``torch.nn.functional.cross_entropy`` and once with ``fastloss.cross_entropy``.

Both runs see the same initial weights and the same deterministic token stream, so their loss curves
must agree (within bf16 tolerance under autocast). The report gives tokens/s, peak memory (CUDA) and
the largest difference between the curves; the exit status is 1 when they disagree.

On CUDA the model has a 128256-token vocabulary and a batch of 8192 tokens, so the logits (and the
loss's temporaries) dominate memory; on CPU a tiny configuration runs in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastloss

from .report import Progress, int_at_least, no_cuda, run_meta, unwritable

LOSS_FNS = {"torch": F.cross_entropy, "fastloss": fastloss.cross_entropy}
TIMING_WARMUP_STEPS = 3  # not counted in tokens/s (allocator warm-up, kernel compilation)


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    d_model: int
    n_heads: int
    n_layers: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    bf16_autocast: bool
    tolerance: float  # max relative difference allowed between the two loss curves
    seed: int = 0


CONFIGS = {
    "gpu": Config(vocab=128256, d_model=512, n_heads=8, n_layers=4, seq_len=1024, batch=8, steps=100, lr=1e-3,
                  bf16_autocast=True, tolerance=2e-2),
    "cpu": Config(vocab=512, d_model=64, n_heads=4, n_layers=2, seq_len=64, batch=8, steps=20, lr=3e-3,
                  bf16_autocast=False, tolerance=1e-4),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4× GELU MLP."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Decoder-only LM with learned positions and an output head tied to the token embedding."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, V] logits


def zipf_tokens(cfg: Config, s: float = 1.1) -> torch.Tensor:
    """A deterministic token stream, [steps, batch, seq_len + 1], made on the CPU from ``cfg.seed``.

    Tokens are Zipf distributed (P(rank k) ∝ k^-s). To give the model something beyond unigram
    statistics, each token is, with probability 1/2, a fixed permutation of the previous draw."""
    gen = torch.Generator().manual_seed(cfg.seed)
    probs = torch.arange(1, cfg.vocab + 1, dtype=torch.float64) ** -s
    ranks_to_ids = torch.randperm(cfg.vocab, generator=gen)  # frequent tokens spread over the vocabulary
    follow = torch.randperm(cfg.vocab, generator=gen)
    shape = (cfg.steps, cfg.batch, cfg.seq_len + 1)
    draws = ranks_to_ids[torch.multinomial(probs, shape[0] * shape[1] * shape[2], True, generator=gen)].view(shape)
    copy = torch.rand(shape, generator=gen) < 0.5
    tokens = draws.clone()
    tokens[..., 1:] = torch.where(copy[..., 1:], follow[draws[..., :-1]], draws[..., 1:])
    return tokens


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train(cfg: Config, loss_name: str, device: torch.device, tokens: torch.Tensor, progress: Progress | None = None):
    """Train from ``cfg.seed`` with one loss function; returns its loss curve, tokens/s and peak memory."""
    loss_fn = LOSS_FNS[loss_name]
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    tokens = tokens.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    losses, start = [], None
    warmup = min(TIMING_WARMUP_STEPS, cfg.steps - 1)
    for step in range(cfg.steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        inputs, targets = tokens[step, :, :-1], tokens[step, :, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = model(inputs)
            loss = loss_fn(logits.reshape(-1, cfg.vocab), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # no .item(): no sync per step
        if progress is not None and (step % 5 == 4 or step == cfg.steps - 1):
            progress.done = step + 1
            progress.status(f"{loss_name}: step {step + 1}/{cfg.steps}")
    _sync(device)
    elapsed = time.perf_counter() - start
    timed_tokens = (cfg.steps - warmup) * cfg.batch * cfg.seq_len
    return {
        "loss_fn": loss_name,
        "losses": torch.stack(losses).float().cpu().tolist(),
        "tokens_per_s": timed_tokens / elapsed,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(a: list[float], b: list[float]) -> dict:
    """Largest absolute and relative difference between two loss curves, and at the first step."""
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rel = [d / max(abs(y), 1e-12) for d, y in zip(diffs, b)]
    return {"max_abs_diff": max(diffs), "max_rel_diff": max(rel), "first_step_rel_diff": rel[0]}


def run(cfg: Config, device: torch.device, verbose: bool = True) -> dict:
    """Both trainings, their comparison, and the verdict (``agree``)."""
    tokens = zipf_tokens(cfg)
    runs = {}
    for name in LOSS_FNS:
        progress = Progress(cfg.steps) if verbose else None
        runs[name] = train(cfg, name, device, tokens, progress)
        if progress is not None:
            progress.clear()
    diff = compare(runs["fastloss"]["losses"], runs["torch"]["losses"])
    finite = all(x == x and abs(x) != float("inf") for r in runs.values() for x in r["losses"])
    return {
        "config": dataclasses.asdict(cfg),
        "runs": runs,
        **diff,
        "agree": finite and diff["max_rel_diff"] <= cfg.tolerance,
    }


def format_result(result: dict) -> str:
    runs, cfg = result["runs"], result["config"]
    lines = ["  loss fn    tokens/s    peak memory   first loss   final loss"]
    for name, r in runs.items():
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib'] / 1024:.2f} GiB"
        lines.append(
            f"  {name:<9} {r['tokens_per_s']:>9.0f}   {peak:>11}   {r['losses'][0]:>10.4f}   {r['losses'][-1]:>10.4f}"
        )
    fl, tr = runs["fastloss"], runs["torch"]
    ratio = f"fastloss vs torch: {fl['tokens_per_s'] / tr['tokens_per_s']:.2f}× tokens/s"
    if fl["peak_mib"] is not None:
        ratio += f", {fl['peak_mib'] / tr['peak_mib']:.2f}× peak memory"
    verdict = "agree ✓" if result["agree"] else "DISAGREE ✗"
    lines += [
        "  " + ratio,
        f"  loss curves: max |Δ| {result['max_abs_diff']:.2e}, max relative {result['max_rel_diff']:.2e} "
        f"(first step {result['first_step_rel_diff']:.2e}), tolerance {cfg['tolerance']:g} → {verdict}",
    ]
    return "\n".join(lines)


def save(directory: str, result: dict) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "train.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    paths = [path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no train.png", stacklevel=2)
        return paths
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for (name, r), style in zip(result["runs"].items(), ("-", "--")):
        label = f"{name} ({r['tokens_per_s']:.0f} tokens/s)"
        top.plot(range(1, len(r["losses"]) + 1), r["losses"], style, label=label)
    top.set_ylabel("training loss")
    top.legend()
    top.grid(alpha=0.3)
    a, b = result["runs"]["fastloss"]["losses"], result["runs"]["torch"]["losses"]
    bottom.plot(range(1, len(a) + 1), [x - y for x, y in zip(a, b)], color="black")
    bottom.set_ylabel("fastloss − torch")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    cfg = result["config"]
    top.set_title(
        f"TinyLM V={cfg['vocab']} d={cfg['d_model']} L={cfg['n_layers']}, {cfg['batch']}×{cfg['seq_len']} tokens/step"
        f"{', bf16 autocast' if cfg['bf16_autocast'] else ''} — {result['meta']['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    path = os.path.join(directory, "train.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths + [path]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("auto", "gpu", "cpu"), default="auto", help="auto: gpu on CUDA, else cpu")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--steps", type=int_at_least(2), default=None,
                   help="override the config's number of steps (at least 2: the first is not timed)")
    p.add_argument("--save", metavar="DIR", help="write train.json and train.png into DIR")
    p.add_argument("--threads", type=int_at_least(0), default=1,
                   help="CPU only: torch threads (default 1; 0 keeps torch's)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(no_cuda("--device cuda"))

    if args.save and (why := unwritable(args.save)):
        p.error(f"--save: {why}")

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cfg = CONFIGS[args.config if args.config != "auto" else ("gpu" if device.type == "cuda" else "cpu")]
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)

    print(
        f"TinyLM: {cfg.n_layers} layers, d={cfg.d_model}, V={cfg.vocab}, {cfg.batch}×{cfg.seq_len} tokens/step, "
        f"{cfg.steps} steps, {'bf16 autocast' if cfg.bf16_autocast else 'fp32'}, on {device.type}",
        flush=True,
    )
    result = run(cfg, device)
    result["meta"] = run_meta(device)
    print(format_result(result))
    if args.save:
        print("wrote " + ", ".join(save(args.save, result)))
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
