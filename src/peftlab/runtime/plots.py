"""Training curves as PNG (matplotlib, headless): the loss, and PPO's reward and KL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # type hints only


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure of the object-oriented API: it draws without pyplot, so no global
    backend is chosen (a user's notebook keeps its own) and no figure has to be closed.
    Imported here, on first use: matplotlib costs ~0.6 s to import, which every command that
    imports the training code (serve, predict, the benchmarks) would pay otherwise."""
    from matplotlib.figure import Figure  # on first use (see the docstring)

    return Figure(figsize=(width, height), dpi=110)


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig = new_figure(6.4, 4.0)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_reward_curve(history: list[dict[str, Any]], path: str | Path, title: str = "",
                      initial_val: float | None = None, xlabel: str = "PPO iteration",
                      kl_label: str = "KL(policy || reference), nats per answer") -> Path:
    """Mean reward per iteration/round, validation reward, and KL (if logged) on a twin axis."""
    steps = [r["step"] for r in history]
    fig = new_figure(6.4, 4.0)
    ax = fig.subplots()
    ax.plot(steps, [r["reward_mean"] for r in history], label="mean reward", lw=1.4)
    val = [(r["step"], r["val_reward_mean"]) for r in history if "val_reward_mean" in r]
    if initial_val is not None:
        val.insert(0, (0, initial_val))
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation reward", lw=1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward")
    lines = ax.get_legend_handles_labels()
    kl = [(r["step"], r["kl"]) for r in history if "kl" in r]
    if kl:
        ax2 = ax.twinx()
        ax2.plot(*zip(*kl, strict=True), color="tab:red", lw=1.0, alpha=0.6, label="KL")
        ax2.set_ylabel(kl_label)
        lines2 = ax2.get_legend_handles_labels()
        lines = (lines[0] + lines2[0], lines[1] + lines2[1])
    ax.legend(*lines, loc="best")
    ax.set_title(title or "PPO")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
