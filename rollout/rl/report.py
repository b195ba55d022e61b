"""What an RL run shows: the reward trend, the per-step table and the plot (reward and logprob mismatch)."""
from __future__ import annotations

import statistics
from pathlib import Path

RISE = 0.05  # the reward "rises" when the last steps average at least this much above the first steps
PLOT_FLOOR = 1e-9  # exact agreement (|delta| = 0) drawn at this height on the log axis


def reward_trend(history: list[dict]) -> tuple[float, float, bool]:
    """(mean reward of the first steps, of the last steps, rising): the first and last fifth of the run."""
    k = max(1, len(history) // 5)
    first = statistics.fmean(m["reward_mean"] for m in history[:k])
    last = statistics.fmean(m["reward_mean"] for m in history[-k:])
    return first, last, last >= first + RISE


def run_summary(history: list[dict]) -> dict:
    """Run-level figures: reward trend, token-weighted mismatch (MXFP8 engine and bf16 control)."""
    first, last, rising = reward_trend(history)
    out = {"reward_first": first, "reward_last": last, "rising": rising, "steps": len(history)}
    for prefix in ("mismatch", "control_mismatch"):
        rows = [m for m in history if f"{prefix}_mean" in m]
        if rows:
            tokens = sum(m[f"{prefix}_tokens"] for m in rows)
            out[f"{prefix}_mean"] = sum(m[f"{prefix}_mean"] * m[f"{prefix}_tokens"] for m in rows) / tokens
            out[f"{prefix}_max"] = max(m[f"{prefix}_max"] for m in rows)
            out[f"{prefix}_frac"] = sum(m[f"{prefix}_frac"] * m[f"{prefix}_tokens"] for m in rows) / tokens
            out[f"{prefix}_tokens"] = tokens
    out["sync_time_s"] = statistics.fmean(m["sync_time_s"] for m in history)
    out["tokens_per_s"] = statistics.fmean(m["tokens_per_s"] for m in history)
    return out


def step_table(history: list[dict]) -> str:
    control = any("control_mismatch_mean" in m for m in history)
    head = (f"{'step':>4} {'reward':>7} {'mismatch':>9} {'max':>9}"
            + (f" {'bf16 ctl':>9} {'ctl max':>9}" if control else "") + f" {'sync_s':>7} {'tok/s':>7}")
    lines = [head]
    for m in history:
        line = f"{m['step']:>4} {m['reward_mean']:>7.3f} {m['mismatch_mean']:>9.2e} {m['mismatch_max']:>9.2e}"
        if control:
            line += (f" {m['control_mismatch_mean']:>9.2e} {m['control_mismatch_max']:>9.2e}"
                     if "control_mismatch_mean" in m else f" {'-':>9} {'-':>9}")
        lines.append(line + f" {m['sync_time_s']:>7.3f} {m['tokens_per_s']:>7.0f}")
    return "\n".join(lines)


def summary_lines(s: dict) -> list[str]:
    lines = [f"reward {s['reward_first']:.2f} -> {s['reward_last']:.2f} "
             f"({'rising' if s['rising'] else 'not rising'}; first vs last fifth of {s['steps']} steps)",
             f"rollout vs trainer |logprob delta| (MXFP8 w8a8 engine): mean {s['mismatch_mean']:.2e}, "
             f"max {s['mismatch_max']:.2e}, {100 * s['mismatch_frac']:.2f}% of {s['mismatch_tokens']} tokens "
             f"above 1e-4"]
    if "control_mismatch_mean" in s:
        ratio = s["control_mismatch_mean"] / max(s["mismatch_mean"], 1e-12)
        lines.append(f"bf16-rollout control: mean {s['control_mismatch_mean']:.2e}, max {s['control_mismatch_max']:.2e}, "
                     f"{100 * s['control_mismatch_frac']:.1f}% of {s['control_mismatch_tokens']} tokens above 1e-4 "
                     f"({ratio:.0f}x the MXFP8 engine's mean)")
    lines.append(f"weight sync {1000 * s['sync_time_s']:.0f} ms per step (export + push + swap), rollouts "
                 f"{s['tokens_per_s']:.0f} tokens/s")
    return lines


def write_plot(history: list[dict], path: Path, title: str) -> Path:
    """Reward (mean and the band of one std) and the mismatch (mean and max, log scale) over steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: leaves the caller's backend alone
    from matplotlib.figure import Figure

    steps = [m["step"] for m in history]
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_r, ax_m = fig.subplots(2, 1, sharex=True)
    mean = [m["reward_mean"] for m in history]
    std = [m["reward_std"] for m in history]
    ax_r.plot(steps, mean, marker="o", ms=3, color="tab:green", label="mean reward")
    ax_r.fill_between(steps, [max(a - b, 0) for a, b in zip(mean, std)], [min(a + b, 1) for a, b in zip(mean, std)],
                      color="tab:green", alpha=0.15, label="± 1 std over samples")
    ax_r.set_ylim(-0.02, 1.02)
    ax_r.set_ylabel("reward")
    ax_r.legend(loc="upper left")
    ax_r.grid(alpha=0.3)
    top = PLOT_FLOOR
    series = [("mismatch", "MXFP8 engine (trainer's recipe)", "tab:blue"),
              ("control_mismatch", "bf16 engine (control)", "tab:red")]
    for prefix, label, color in series:
        rows = [m for m in history if f"{prefix}_mean" in m]
        if not rows:
            continue
        x = [m["step"] for m in rows]
        top = max(top, *(m[f"{prefix}_max"] for m in rows))
        ax_m.plot(x, [max(m[f"{prefix}_mean"], PLOT_FLOOR) for m in rows], marker="o", ms=3, color=color,
                  label=f"{label}: mean")
        ax_m.plot(x, [max(m[f"{prefix}_max"], PLOT_FLOOR) for m in rows], ls="--", color=color, alpha=0.6,
                  label=f"{label}: max")
    ax_m.set_yscale("log")
    ax_m.set_ylim(top=top * 1e2)  # headroom for the legend above the curves
    ax_m.set_ylabel("|rollout - trainer| logprob")
    ax_m.set_xlabel("step")
    ax_m.legend(loc="upper center", ncols=2, fontsize="small")
    ax_m.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
