"""The run's PNG: training loss by phase (left) and held-out loss of both domains (right).

matplotlib with the Agg backend, so no display is needed. The held-out panel is what compares runs: the
training loss of a replay run is measured on mixed data, so it is not comparable with a run without replay.
"""

from __future__ import annotations

from pathlib import Path

RUN_STYLES = ("-", "--", "-.", ":")


def plot_run(
    curves: dict[str, list[tuple[int, float]]],
    heldout: dict[str, list[dict[str, float]]],
    base: dict[str, float],
    path: str | Path,
    *,
    names: dict[str, str] | None = None,
    logging_steps: int = 10,
    max_steps: int = 0,
) -> Path | None:
    """Writes the PNG; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from cpt_plugin.evaluation import draw_heldout

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(13, 5))
    offset = 0
    phase_change = None
    for name, points in curves.items():
        if not points:
            continue
        steps = [offset + s for s, _ in points]
        train_ax.plot(steps, [loss for _, loss in points], label=name)
        if name.startswith("base"):
            offset = steps[-1]  # CPT runs continue from where the base training stopped
            phase_change = offset
    if phase_change is not None:
        train_ax.axvline(phase_change, color="grey", linestyle="--", linewidth=1)
        train_ax.annotate(
            " CPT starts (new domain)",
            (phase_change, 1.0),
            xycoords=("data", "axes fraction"),
            va="top",
            fontsize="small",
            color="grey",
        )
    if any(name.startswith("CPT") and not points for name, points in curves.items()):
        train_ax.text(
            0.5,
            0.5,
            f"CPT ran {max_steps} steps, fewer than logging_steps={logging_steps}:\n"
            "no CPT training loss was logged",
            transform=train_ax.transAxes,
            ha="center",
            fontsize="small",
            color="grey",
        )
    train_ax.set_xlabel("optimizer step")
    train_ax.set_ylabel("training loss (replay runs: on mixed data)")
    train_ax.set_title("training loss")
    train_ax.grid(alpha=0.3)
    if train_ax.lines:
        train_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small")

    for index, (name, history) in enumerate(heldout.items()):
        draw_heldout(
            eval_ax,
            history,
            base,
            names=names,
            label=f", {name}",
            linestyle=RUN_STYLES[index % len(RUN_STYLES)],
            base_lines=index == 0,
        )
    eval_ax.set_title("held-out loss of each domain (lower is better)")
    if eval_ax.lines:
        eval_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small")
    fig.suptitle("cpt-plugin: adaptation (new domain) and forgetting (old domain)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
